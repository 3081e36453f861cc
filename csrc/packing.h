// Pack index and blending index builders (see eve_megatron/data/packing.py).
#pragma once

#include <pybind11/pybind11.h>

namespace eve {

// Registers build_pack_index and build_blend_index on the extension module.
void register_packing(pybind11::module_ &m);

}  // namespace eve
