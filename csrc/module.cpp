// The single pybind11 module of eve_megatron: every C++ component registers itself here.
#include <pybind11/pybind11.h>

#include "packing.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "eve_megatron C++ extension";
  eve::register_packing(m);
}
