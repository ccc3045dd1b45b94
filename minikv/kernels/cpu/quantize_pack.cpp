// Grouped 2/4-bit quantization + packing on CPU, bit-exact with minikv.kernels.quant.quantize_pack.
//
// The arithmetic repeats the reference's fp32 operations in its order: NaN-propagating min/max, the
// minimum rounded down and the scale rounded up to fp16, (x - mn) * (1 / scale) rounded half to even
// and clamped, the clip-ratio search over the same fp32 table with errors summed in fp64 from exact
// squares of fp32 differences (min-max wins ties; NaN errors never win). Built with
// -ffp-contract=off: no FMA may fuse a product and a sum that the reference rounds separately.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr float kTiny = 5.960464477539063e-08f;  // 2**-24, the smallest fp16 subnormal

inline uint16_t bits_of(c10::Half h) { return h.x; }
inline c10::Half from_bits(uint16_t b) { return c10::Half(b, c10::Half::from_bits()); }

// the fp16 value nearest to x on the side `up` (above) or below it
inline c10::Half fp16_neighbour(float x, bool up) {
  const c10::Half y(x);  // round to nearest even
  const float yf = static_cast<float>(y);
  if (!(up ? yf < x : yf > x)) return y;  // exact side already (or NaN)
  const uint16_t b = bits_of(y);
  const bool negative = (b & 0x8000u) != 0, zero = (b & 0x7fffu) == 0;
  if (zero) return from_bits(up ? 0x0001u : 0x8001u);
  // away from zero on the negative side when going down, towards zero when going up (and vice versa)
  const bool grow = up != negative;
  return from_bits(static_cast<uint16_t>(grow ? b + 1 : b - 1));
}

struct Candidate {
  float lo, scale;  // fp32 values of the fp16 minimum and scale
  c10::Half lo_h, scale_h;
};

inline Candidate candidate(c10::Half lo_h, float span, int qmax) {
  float s = span / static_cast<float>(qmax);
  s = std::isnan(s) ? s : (s < kTiny ? kTiny : s);  // clamp_min keeps NaN
  const c10::Half scale_h = fp16_neighbour(s, true);
  return {static_cast<float>(lo_h), static_cast<float>(scale_h), lo_h, scale_h};
}

inline void codes_of(const float* x, int64_t G, const Candidate& c, int qmax, float* q) {
  const float inv = 1.0f / c.scale;
  for (int64_t t = 0; t < G; ++t) {
    float v = std::nearbyint((x[t] - c.lo) * inv);  // round half to even (default rounding mode)
    v = v < 0.f ? 0.f : v;
    q[t] = v > static_cast<float>(qmax) ? static_cast<float>(qmax) : v;
  }
}

inline double squared_error(const float* x, const float* q, int64_t G, const Candidate& c) {
  double e = 0.0;
  for (int64_t t = 0; t < G; ++t) {
    const float recon = q[t] * c.scale + c.lo;
    const double d = static_cast<double>(x[t] - recon);
    e += d * d;
  }
  return std::isnan(e) ? INFINITY : e;
}

std::vector<at::Tensor> quantize_pack(const at::Tensor& x_in, const at::Tensor& clip_table, int64_t bits,
                                      int64_t group_size, bool clip) {
  TORCH_CHECK(bits == 2 || bits == 4, "quantize_pack: bits must be 2 or 4, got ", bits);
  const int64_t G = group_size, N = x_in.size(-1), per_word = 32 / bits;
  TORCH_CHECK(G > 0 && N % G == 0 && G % per_word == 0, "quantize_pack: group_size ", G, " must divide ", N);
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const at::Tensor table = clip_table.to(at::kFloat).contiguous();
  const int64_t n_groups = x.numel() / G, n_clip = clip ? table.size(0) : 1;
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 1);
  std::vector<int64_t> code_shape(lead), meta_shape(lead);
  code_shape.push_back(N / per_word);
  meta_shape.push_back(N / G);
  at::Tensor codes = at::empty(code_shape, x.options().dtype(at::kInt));
  at::Tensor scale = at::empty(meta_shape, x.options().dtype(at::kHalf));
  at::Tensor mn = at::empty(meta_shape, x.options().dtype(at::kHalf));
  const float* xp = x.data_ptr<float>();
  const float* tp = table.data_ptr<float>();
  int32_t* cp = codes.data_ptr<int32_t>();
  c10::Half* sp = scale.data_ptr<c10::Half>();
  c10::Half* mp = mn.data_ptr<c10::Half>();
  const int qmax = (1 << bits) - 1;
  at::parallel_for(0, n_groups, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> q(G), best_q(G);
    for (int64_t gi = begin; gi < end; ++gi) {
      const float* xg = xp + gi * G;
      bool finite = true, has_nan = false;
      float lo = xg[0], hi = xg[0];
      for (int64_t t = 0; t < G; ++t) {
        const float v = xg[t];
        finite = finite && std::isfinite(v);
        has_nan = has_nan || std::isnan(v);
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
      }
      if (has_nan) lo = hi = NAN;  // torch's amin / amax propagate NaN
      const c10::Half low = fp16_neighbour(lo, false);
      const float span = hi - static_cast<float>(low);
      Candidate best = candidate(low, span, qmax);
      codes_of(xg, G, best, qmax, best_q.data());
      if (n_clip > 1) {
        double best_err = squared_error(xg, best_q.data(), G, best);
        for (int64_t k = 1; k < n_clip; ++k) {
          const float ratio = tp[2 * k], half = tp[2 * k + 1];
          const c10::Half lo_k = fp16_neighbour(static_cast<float>(low) + span * half, false);
          const Candidate c = candidate(lo_k, span * ratio, qmax);
          codes_of(xg, G, c, qmax, q.data());
          const double err = squared_error(xg, q.data(), G, c);
          if (err < best_err) {  // the first of equal minima wins, as argmin
            best_err = err;
            best = c;
            best_q.swap(q);
          }
        }
      }
      sp[gi] = best.scale_h;
      mp[gi] = best.lo_h;
      int32_t* words = cp + gi * (G / per_word);
      for (int64_t w = 0; w < G / per_word; ++w) {
        uint32_t word = 0;
        for (int64_t j = 0; j < per_word; ++j) {
          const uint32_t code = finite ? static_cast<uint32_t>(best_q[w * per_word + j]) & qmax : 0u;
          word |= code << (bits * j);
        }
        std::memcpy(&words[w], &word, sizeof(word));
      }
    }
  });
  return {codes, scale, mn};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(minikv_cpu, m) {
  m.def("quantize_pack(Tensor x, Tensor clip_table, int bits, int group_size, bool clip) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(minikv_cpu, CPU, m) { m.impl("quantize_pack", &quantize_pack); }
