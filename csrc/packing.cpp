// Deterministic shuffled best-fit-decreasing packing and Megatron-style weighted blending.
// The pure-Python reference in eve_megatron/data/packing_reference.py must produce
// byte-identical output; any change here has to be mirrored there.
#include "packing.h"

#include <pybind11/numpy.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace eve {
namespace {

// SplitMix64: tiny, fast, and trivially reproducible in Python.
struct SplitMix64 {
  uint64_t state;
  uint64_t next() {
    state += 0x9E3779B97F4A7C15ULL;
    uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  // Uniform-ish integer in [0, n) by multiply-shift (no rejection: identical in Python).
  uint64_t bounded(uint64_t n) {
    return static_cast<uint64_t>((static_cast<unsigned __int128>(next()) * n) >> 64);
  }
};

template <typename T>
void shuffle(std::vector<T> &v, SplitMix64 &rng) {
  for (size_t i = v.size(); i > 1; --i) {
    size_t j = rng.bounded(i);
    std::swap(v[i - 1], v[j]);
  }
}

// Buckets of open bins keyed by remaining capacity, each a LIFO stack (linked through
// next_), plus a bitset of non-empty buckets to find the best fit quickly.
class CapacityBuckets {
 public:
  explicit CapacityBuckets(int64_t capacity)
      : head_(capacity + 1, -1), bits_((capacity + 64) / 64, 0) {}

  // Empties every bucket touched since the last reset (cheap for small windows).
  void reset() {
    for (int64_t rem : touched_) {
      head_[rem] = -1;
      bits_[rem >> 6] = 0;
    }
    touched_.clear();
    next_.clear();
  }
  int64_t new_bin() {
    next_.push_back(-1);
    return static_cast<int64_t>(next_.size()) - 1;
  }
  void push(int64_t rem, int64_t bin) {
    if (head_[rem] < 0) touched_.push_back(rem);
    next_[bin] = head_[rem];
    head_[rem] = bin;
    bits_[rem >> 6] |= (1ULL << (rem & 63));
  }
  // Smallest remaining capacity >= need that has a bin, or -1.
  int64_t smallest_at_least(int64_t need) const {
    size_t w = static_cast<size_t>(need >> 6);
    if (w >= bits_.size()) return -1;
    uint64_t word = bits_[w] & (~0ULL << (need & 63));
    while (true) {
      if (word) return static_cast<int64_t>(w * 64 + __builtin_ctzll(word));
      if (++w >= bits_.size()) return -1;
      word = bits_[w];
    }
  }
  int64_t pop(int64_t rem) {
    int64_t bin = head_[rem];
    head_[rem] = next_[bin];
    if (head_[rem] < 0) bits_[rem >> 6] &= ~(1ULL << (rem & 63));
    return bin;
  }

 private:
  std::vector<int64_t> head_;
  std::vector<int64_t> next_;
  std::vector<uint64_t> bits_;
  std::vector<int64_t> touched_;
};

// Window positions ordered by length descending, ties by position (a stable sort).
void sort_decreasing(const std::vector<int64_t> &len, std::vector<int64_t> &order) {
  const size_t n = len.size();
  order.resize(n);
  if (n == 0) return;
  const auto [lo_it, hi_it] = std::minmax_element(len.begin(), len.end());
  const int64_t lo = *lo_it, range = *hi_it - lo + 1;
  if (range <= static_cast<int64_t>(4 * n + 64)) {  // counting sort
    std::vector<int64_t> start(range + 1, 0);
    for (int64_t l : len) ++start[*hi_it - l + 1];
    for (int64_t r = 0; r < range; ++r) start[r + 1] += start[r];
    for (size_t k = 0; k < n; ++k) order[start[*hi_it - len[k]]++] = static_cast<int64_t>(k);
    return;
  }
  for (size_t k = 0; k < n; ++k) order[k] = static_cast<int64_t>(k);
  std::stable_sort(order.begin(), order.end(),
                   [&len](int64_t a, int64_t b) { return len[a] > len[b]; });
}

// Best-fit-decreasing of one window; appends packs (in shuffled order) to the output.
void pack_window(const int64_t *lengths, const int64_t *window, size_t n, int64_t capacity,
                 CapacityBuckets &buckets, SplitMix64 &rng, std::vector<int64_t> &offsets,
                 std::vector<int64_t> &samples) {
  std::vector<int64_t> len(n), order, bin_of(n);
  for (size_t k = 0; k < n; ++k) len[k] = lengths[window[k]];
  sort_decreasing(len, order);
  buckets.reset();
  int64_t n_bins = 0;
  for (int64_t k : order) {
    int64_t rem = buckets.smallest_at_least(len[k]);
    int64_t bin;
    if (rem >= 0) {
      bin = buckets.pop(rem);
    } else {
      bin = buckets.new_bin();
      rem = capacity;
      ++n_bins;
    }
    buckets.push(rem - len[k], bin);
    bin_of[k] = bin;
  }
  // Group members per bin in insertion order, then emit bins in shuffled order.
  std::vector<int64_t> start(n_bins + 1, 0), members(n);
  for (int64_t b : bin_of) ++start[b + 1];
  for (int64_t b = 0; b < n_bins; ++b) start[b + 1] += start[b];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t k : order) members[fill[bin_of[k]]++] = window[k];
  std::vector<int64_t> bins(n_bins);
  for (int64_t b = 0; b < n_bins; ++b) bins[b] = b;
  shuffle(bins, rng);
  for (int64_t b : bins) {
    samples.insert(samples.end(), members.begin() + start[b], members.begin() + start[b + 1]);
    offsets.push_back(static_cast<int64_t>(samples.size()));
  }
}

py::tuple build_pack_index(py::array_t<int64_t, py::array::c_style | py::array::forcecast> lengths,
                           int64_t seq_length, uint64_t seed, uint64_t epoch, int64_t window) {
  if (lengths.ndim() != 1) throw std::invalid_argument("lengths must be 1-D");
  if (seq_length < 1) throw std::invalid_argument("seq_length must be >= 1");
  if (window < 1) throw std::invalid_argument("shuffle window must be >= 1");
  const int64_t n = lengths.shape(0);
  const int64_t *len = lengths.data();
  for (int64_t i = 0; i < n; ++i) {
    if (len[i] < 1 || len[i] > seq_length)
      throw std::invalid_argument("sample " + std::to_string(i) + " has length " +
                                  std::to_string(len[i]) + ", outside [1, seq_length=" +
                                  std::to_string(seq_length) + "]");
  }
  std::vector<int64_t> offsets{0}, samples;
  samples.reserve(n);
  {
    py::gil_scoped_release release;
    SplitMix64 rng{seed ^ (epoch * 0xD1B54A32D192ED03ULL)};
    std::vector<int64_t> perm(n);
    for (int64_t i = 0; i < n; ++i) perm[i] = i;
    shuffle(perm, rng);
    CapacityBuckets buckets(seq_length);
    for (int64_t s = 0; s < n; s += window) {
      const size_t count = static_cast<size_t>(std::min(n, s + window) - s);
      pack_window(len, perm.data() + s, count, seq_length, buckets, rng, offsets, samples);
    }
  }
  py::array_t<int64_t> off_arr(offsets.size()), smp_arr(samples.size());
  std::copy(offsets.begin(), offsets.end(), off_arr.mutable_data());
  std::copy(samples.begin(), samples.end(), smp_arr.mutable_data());
  return py::make_tuple(off_arr, smp_arr);
}

// Megatron's greedy blending: sample i goes to the dataset furthest below its share.
py::tuple build_blend_index(py::array_t<double, py::array::c_style | py::array::forcecast> weights,
                            int64_t size) {
  if (weights.ndim() != 1 || weights.shape(0) < 1)
    throw std::invalid_argument("weights must be a non-empty 1-D array");
  if (size < 0) throw std::invalid_argument("size must be >= 0");
  const int64_t k = weights.shape(0);
  const double *w = weights.data();
  py::array_t<int32_t> ds_arr(size);
  py::array_t<int64_t> idx_arr(size);
  int32_t *ds = ds_arr.mutable_data();
  int64_t *idx = idx_arr.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> counts(k, 0);
    for (int64_t i = 0; i < size; ++i) {
      const double t = std::max(static_cast<double>(i), 1.0);
      int64_t best = 0;
      double best_err = w[0] * t - static_cast<double>(counts[0]);
      for (int64_t d = 1; d < k; ++d) {
        const double err = w[d] * t - static_cast<double>(counts[d]);
        if (err > best_err) {
          best_err = err;
          best = d;
        }
      }
      ds[i] = static_cast<int32_t>(best);
      idx[i] = counts[best]++;
    }
  }
  return py::make_tuple(ds_arr, idx_arr);
}

}  // namespace

void register_packing(py::module_ &m) {
  m.def("build_pack_index", &build_pack_index, py::arg("lengths"), py::arg("seq_length"),
        py::arg("seed"), py::arg("epoch"), py::arg("window"),
        "Shuffled best-fit-decreasing pack index: returns (pack_offsets, pack_samples).");
  m.def("build_blend_index", &build_blend_index, py::arg("weights"), py::arg("size"),
        "Megatron-style weighted blending: returns (dataset_index, dataset_sample_index).");
}

}  // namespace eve
