// Decode attention over minikv's packed store, an optional precision tier (a second packed store of
// other widths) and the full-precision residual, on CPU, in one pass over the codes: unpack +
// dequantize a tile of G tokens, dot with the query group, softmax, weighted sum.
//
// Same contract as minikv.kernels.reference.decode_attention (the yardstick, see its docstring):
// q [B, Hq, Lq, D]; keys k_codes [B, Hkv, D, C*kb/32] int32 with k_scale/k_mn [B, Hkv, D, C/G] fp16
// (per channel, grouped along tokens); values v_codes [B, Hkv, C, D*vb/32] with v_scale/v_mn
// [B, Hkv, C, D/G] fp16 (per token, grouped along channels); res_k/res_v [B, Hkv, S+R, D];
// n_packed [B, Hkv] int64 (per KV head), res_len [B] int64. Query i of Lq sees the first n_packed + res_len - (Lq - 1 - i) cached
// tokens (store first, then residual). Work units are (sequence, KV head, token range) with their
// own softmax state (flash-decoding splits), merged by log-sum-exp; threads run over units.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kMinSplitTokens = 256;  // a unit reads at least this many packed tokens

struct Shape {
  int64_t B, Hkv, g, Lq, D, C, SR, G, rows;
  float scale, softcap;
};

enum class Part { kStore, kResidual, kTier };

struct Unit {
  int64_t bh, start, end;  // tokens [start, end) of the store, the residual or the tier
  Part part;
};

inline float logit(float dot, const Shape& s) {
  float x = dot * s.scale;
  return s.softcap > 0.f ? s.softcap * std::tanh(x / s.softcap) : x;
}

// codes of one int32 word -> floats, code * scale + mn
template <int BITS>
inline void unpack_word(uint32_t w, float scale, float mn, float* out) {
  constexpr int PW = 32 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  for (int j = 0; j < PW; ++j) out[j] = static_cast<float>((w >> (BITS * j)) & MASK) * scale + mn;
}

// Softmax state of one unit: logits [rows, n] in `s` -> m, l, acc [rows, D] (unnormalised).
struct Partial {
  float* m;
  float* l;
  float* acc;
};

inline void softmax_rows(const Shape& sh, float* s, int64_t n, Partial out) {
  for (int64_t r = 0; r < sh.rows; ++r) {
    float* row = s + r * n;
    float m = kNegInf;
    for (int64_t t = 0; t < n; ++t) m = std::max(m, row[t]);
    out.m[r] = m;
    float l = 0.f;
    if (m == kNegInf) {
      std::fill(row, row + n, 0.f);
    } else {
      for (int64_t t = 0; t < n; ++t) {
        row[t] = std::exp(row[t] - m);  // exp(-inf) = 0 for masked tokens
        l += row[t];
      }
    }
    out.l[r] = l;
  }
}

template <int KB, int VB>
void store_unit(const Shape& sh, const Unit& u, int64_t n_packed, int64_t res_len, const float* q,
                const int32_t* kc, const at::Half* ks, const at::Half* km, const int32_t* vc,
                const at::Half* vs, const at::Half* vm, Partial out) {
  constexpr int KPW = 32 / KB, VPW = 32 / VB;
  const int64_t D = sh.D, G = sh.G, C = sh.C, n = u.end - u.start, rows = sh.rows;
  const int64_t kwords = C / KPW, vwords = D / VPW, cg = C / G, dg = D / G;
  std::vector<float> s(rows * n), tile(G * D), dot(G);
  const int32_t* kc_h = kc + u.bh * D * kwords;
  const at::Half* ks_h = ks + u.bh * D * cg;
  const at::Half* km_h = km + u.bh * D * cg;
  for (int64_t blk = u.start; blk < u.end; blk += G) {
    const int64_t gi = blk / G;
    for (int64_t d = 0; d < D; ++d) {  // tile[d, t]: channel d of tokens blk..blk+G
      const float sc = static_cast<float>(ks_h[d * cg + gi]), mn = static_cast<float>(km_h[d * cg + gi]);
      const int32_t* w = kc_h + d * kwords + blk / KPW;
      for (int64_t wi = 0; wi < G / KPW; ++wi) unpack_word<KB>(static_cast<uint32_t>(w[wi]), sc, mn, &tile[d * G + wi * KPW]);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* qr = q + r * D;
      std::fill(dot.begin(), dot.end(), 0.f);
      for (int64_t d = 0; d < D; ++d) {
        const float qd = qr[d];
        const float* kt = &tile[d * G];
        for (int64_t t = 0; t < G; ++t) dot[t] = std::fma(qd, kt[t], dot[t]);
      }
      const int64_t limit = n_packed + res_len - (sh.Lq - 1 - r % sh.Lq);
      float* sr = &s[r * n + (blk - u.start)];
      for (int64_t t = 0; t < G; ++t) sr[t] = blk + t < limit ? logit(dot[t], sh) : kNegInf;
    }
  }
  softmax_rows(sh, s.data(), n, out);
  std::fill(out.acc, out.acc + rows * D, 0.f);
  const int32_t* vc_h = vc + u.bh * C * vwords;
  const at::Half* vs_h = vs + u.bh * C * dg;
  const at::Half* vm_h = vm + u.bh * C * dg;
  for (int64_t blk = u.start; blk < u.end; blk += G) {
    for (int64_t t = 0; t < G; ++t) {  // tile[t, d]: token blk + t
      const int64_t tok = blk + t;
      const int32_t* w = vc_h + tok * vwords;
      for (int64_t c = 0; c < dg; ++c) {
        const float sc = static_cast<float>(vs_h[tok * dg + c]), mn = static_cast<float>(vm_h[tok * dg + c]);
        for (int64_t wi = 0; wi < G / VPW; ++wi)
          unpack_word<VB>(static_cast<uint32_t>(w[c * (G / VPW) + wi]), sc, mn, &tile[t * D + c * G + wi * VPW]);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* acc = out.acc + r * D;
      const float* p = &s[r * n + (blk - u.start)];
      for (int64_t t = 0; t < G; ++t) {
        const float pt = p[t];
        if (pt == 0.f) continue;
        const float* vt = &tile[t * D];
        for (int64_t d = 0; d < D; ++d) acc[d] = std::fma(pt, vt[d], acc[d]);
      }
    }
  }
}

// the residual read in its own dtype (residual_dtype: fp16 or bf16, or the model's), each element as fp32
template <typename T>
void residual_unit(const Shape& sh, const Unit& u, int64_t n_packed, int64_t res_len, const float* q,
                   const void* rk, const void* rv, Partial out) {
  const int64_t D = sh.D, n = u.end - u.start, rows = sh.rows;
  std::vector<float> s(rows * n);
  const T* rk_h = static_cast<const T*>(rk) + u.bh * sh.SR * D;
  const T* rv_h = static_cast<const T*>(rv) + u.bh * sh.SR * D;
  for (int64_t r = 0; r < rows; ++r) {
    const float* qr = q + r * D;
    const int64_t limit = n_packed + res_len - (sh.Lq - 1 - r % sh.Lq);
    for (int64_t j = u.start; j < u.end; ++j) {
      const T* k = rk_h + j * D;
      float dot = 0.f;
      for (int64_t d = 0; d < D; ++d) dot += qr[d] * static_cast<float>(k[d]);
      s[r * n + j - u.start] = n_packed + j < limit ? logit(dot, sh) : kNegInf;
    }
  }
  softmax_rows(sh, s.data(), n, out);
  std::fill(out.acc, out.acc + rows * D, 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    float* acc = out.acc + r * D;
    for (int64_t j = u.start; j < u.end; ++j) {
      const float p = s[r * n + j - u.start];
      if (p == 0.f) continue;
      const T* v = rv_h + j * D;
      for (int64_t d = 0; d < D; ++d) acc[d] += p * static_cast<float>(v[d]);
    }
  }
}

using StoreFn = decltype(&store_unit<2, 2>);
using ResidualFn = decltype(&residual_unit<float>);

ResidualFn pick_residual(at::ScalarType t) {
  if (t == at::kFloat) return &residual_unit<float>;
  if (t == at::kDouble) return &residual_unit<double>;  // fp64 models (the tests' references)
  if (t == at::kHalf) return &residual_unit<at::Half>;
  if (t == at::kBFloat16) return &residual_unit<at::BFloat16>;
  TORCH_CHECK(false, "decode_attention: the residual must be float64, float32, float16 or bfloat16, got ", t);
}

StoreFn pick(int64_t kb, int64_t vb) {
  if (kb == 2 && vb == 2) return &store_unit<2, 2>;
  if (kb == 2 && vb == 4) return &store_unit<2, 4>;
  if (kb == 4 && vb == 2) return &store_unit<4, 2>;
  if (kb == 4 && vb == 4) return &store_unit<4, 4>;
  TORCH_CHECK(false, "decode_attention: k_bits and v_bits must be 2 or 4, got ", kb, " and ", vb);
}

using OptTensor = std::optional<at::Tensor>;

at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_codes, const at::Tensor& k_scale,
                            const at::Tensor& k_mn, const at::Tensor& v_codes, const at::Tensor& v_scale,
                            const at::Tensor& v_mn, const at::Tensor& n_packed_t, const at::Tensor& res_k_in,
                            const at::Tensor& res_v_in, const at::Tensor& res_len_t, double scale, double softcap,
                            int64_t k_bits, int64_t v_bits, int64_t group_size, const OptTensor& tk_codes,
                            const OptTensor& tk_scale, const OptTensor& tk_mn, const OptTensor& tv_codes,
                            const OptTensor& tv_scale, const OptTensor& tv_mn, const OptTensor& n_tier_t,
                            int64_t tier_k_bits, int64_t tier_v_bits) {
  TORCH_CHECK(q_in.dim() == 4 && res_k_in.dim() == 4, "decode_attention: q and res_k must be 4-d");
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Lq = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = res_k_in.size(1), SR = res_k_in.size(2), G = group_size;
  const int64_t C = v_codes.size(2);
  TORCH_CHECK(Hq % Hkv == 0, "decode_attention: query heads ", Hq, " not a multiple of KV heads ", Hkv);
  TORCH_CHECK(G > 0 && C % G == 0 && D % G == 0 && G % (32 / k_bits) == 0 && G % (32 / v_bits) == 0,
              "decode_attention: group_size ", G, " must divide the capacity ", C, " and head_dim ", D);
  const bool tiered = n_tier_t.has_value();
  TORCH_CHECK(tiered == (tk_codes.has_value() && tk_scale.has_value() && tk_mn.has_value() && tv_codes.has_value() &&
                         tv_scale.has_value() && tv_mn.has_value()),
              "decode_attention: give all of the tier's tensors (tier_*, n_tier) or none");
  const int64_t Ct = tiered ? tv_codes->size(2) : 0;
  std::vector<const at::Tensor*> codes{&k_codes, &v_codes}, scales{&k_scale, &k_mn, &v_scale, &v_mn};
  if (tiered) {
    TORCH_CHECK(Ct % G == 0 && G % (32 / tier_k_bits) == 0 && G % (32 / tier_v_bits) == 0,
                "decode_attention: the tier's capacity ", Ct, " must be whole groups of ", G);
    codes.insert(codes.end(), {&*tk_codes, &*tv_codes});
    scales.insert(scales.end(), {&*tk_scale, &*tk_mn, &*tv_scale, &*tv_mn});
  }
  for (const at::Tensor* t : codes)
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(), "decode_attention: codes must be contiguous int32");
  for (const at::Tensor* t : scales)
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous(), "decode_attention: scales must be contiguous fp16");
  const at::Tensor q = q_in.to(at::kFloat).contiguous();
  // the residual is read in place, in its own dtype (no per-step copy): contiguous() is the store's buffer
  const at::Tensor rk = res_k_in.contiguous(), rv = res_v_in.to(res_k_in.scalar_type()).contiguous();
  const ResidualFn residual_fn = pick_residual(rk.scalar_type());
  const at::Tensor npk = n_packed_t.to(at::kLong).contiguous(), rl = res_len_t.to(at::kLong).contiguous();
  TORCH_CHECK(npk.numel() == B * Hkv && rl.numel() == B, "decode_attention: n_packed must be [B, Hkv] and res_len [B]");
  const Shape sh{B, Hkv, Hq / Hkv, Lq, D, C, SR, G, (Hq / Hkv) * Lq, static_cast<float>(scale),
                 static_cast<float>(softcap)};

  // work units: each (sequence, KV head) splits its packed tokens so that every thread has work
  const int64_t threads = at::get_num_threads();
  const int64_t per_head = std::max<int64_t>(1, (4 * threads + B * Hkv - 1) / (B * Hkv));
  const int64_t want = std::max(kMinSplitTokens, (C + per_head - 1) / per_head);
  const int64_t chunk = (want + G - 1) / G * G;  // whole groups
  std::vector<Unit> units;
  std::vector<int64_t> first(B * Hkv + 1);
  const int64_t* np = npk.data_ptr<int64_t>();
  const int64_t* rlp = rl.data_ptr<int64_t>();
  const at::Tensor nt = tiered ? n_tier_t->to(at::kLong).contiguous() : at::Tensor();
  TORCH_CHECK(!tiered || nt.numel() == B * Hkv, "decode_attention: n_tier must be [B, Hkv]");
  const int64_t* ntp = tiered ? nt.data_ptr<int64_t>() : nullptr;
  for (int64_t bh = 0; bh < B * Hkv; ++bh) {
    first[bh] = static_cast<int64_t>(units.size());
    const int64_t b = bh / Hkv;
    if (tiered) {
      const int64_t n = std::clamp<int64_t>(ntp[bh], 0, Ct) / G * G;
      for (int64_t s = 0; s < n; s += chunk) units.push_back({bh, s, std::min(s + chunk, n), Part::kTier});
    }
    const int64_t n = std::clamp<int64_t>(np[bh], 0, C) / G * G, r = std::clamp<int64_t>(rlp[b], 0, SR);
    for (int64_t s = 0; s < n; s += chunk) units.push_back({bh, s, std::min(s + chunk, n), Part::kStore});
    if (r > 0) units.push_back({bh, 0, r, Part::kResidual});
  }
  first[B * Hkv] = static_cast<int64_t>(units.size());
  const int64_t rows = sh.rows, nu = static_cast<int64_t>(units.size());
  std::vector<float> m(nu * rows), l(nu * rows), acc(nu * rows * D);
  const StoreFn store_fn = pick(k_bits, v_bits);
  const StoreFn tier_fn = tiered ? pick(tier_k_bits, tier_v_bits) : nullptr;
  Shape tier_sh = sh;
  tier_sh.C = Ct;
  constexpr int64_t kSeesAll = std::numeric_limits<int64_t>::max() / 4;  // the tier is older than any new token
  const float* qp = q.data_ptr<float>();
  at::parallel_for(0, nu, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Unit& u = units[i];
      const int64_t b = u.bh / Hkv;
      const Partial part{&m[i * rows], &l[i * rows], &acc[i * rows * D]};
      const float* qu = qp + u.bh * rows * D;  // the query group's rows are contiguous
      if (u.part == Part::kResidual)
        residual_fn(sh, u, np[u.bh], rlp[b], qu, rk.data_ptr(), rv.data_ptr(), part);
      else if (u.part == Part::kTier)
        tier_fn(tier_sh, u, kSeesAll, 0, qu, tk_codes->data_ptr<int32_t>(), tk_scale->data_ptr<at::Half>(),
                tk_mn->data_ptr<at::Half>(), tv_codes->data_ptr<int32_t>(), tv_scale->data_ptr<at::Half>(),
                tv_mn->data_ptr<at::Half>(), part);
      else
        store_fn(sh, u, np[u.bh], rlp[b], qu, k_codes.data_ptr<int32_t>(), k_scale.data_ptr<at::Half>(),
                 k_mn.data_ptr<at::Half>(), v_codes.data_ptr<int32_t>(), v_scale.data_ptr<at::Half>(),
                 v_mn.data_ptr<at::Half>(), part);
    }
  });

  at::Tensor out = at::zeros({B, Hq, Lq, D}, q.options());
  float* op = out.data_ptr<float>();
  for (int64_t bh = 0; bh < B * Hkv; ++bh) {  // merge the units of each row by log-sum-exp
    for (int64_t r = 0; r < rows; ++r) {
      float mx = kNegInf;
      for (int64_t i = first[bh]; i < first[bh + 1]; ++i) mx = std::max(mx, m[i * rows + r]);
      if (mx == kNegInf) continue;  // nothing visible: zeros, as the reference
      float denom = 0.f;
      float* o = op + (bh * rows + r) * D;
      for (int64_t i = first[bh]; i < first[bh + 1]; ++i) {
        const float mi = m[i * rows + r];
        if (mi == kNegInf) continue;
        const float w = std::exp(mi - mx);
        denom += w * l[i * rows + r];
        const float* a = &acc[(i * rows + r) * D];
        for (int64_t d = 0; d < D; ++d) o[d] += w * a[d];
      }
      for (int64_t d = 0; d < D; ++d) o[d] /= denom;
    }
  }
  return out.to(q_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(minikv_cpu, m) {
  m.def(
      "decode_attention(Tensor q, Tensor k_codes, Tensor k_scale, Tensor k_mn, Tensor v_codes, Tensor v_scale, "
      "Tensor v_mn, Tensor n_packed, Tensor res_k, Tensor res_v, Tensor res_len, float scale, float softcap, "
      "int k_bits, int v_bits, int group_size, Tensor? tier_k_codes=None, Tensor? tier_k_scale=None, "
      "Tensor? tier_k_mn=None, Tensor? tier_v_codes=None, Tensor? tier_v_scale=None, Tensor? tier_v_mn=None, "
      "Tensor? n_tier=None, int tier_k_bits=4, int tier_v_bits=4) -> Tensor");
}

TORCH_LIBRARY_IMPL(minikv_cpu, CPU, m) { m.impl("decode_attention", &decode_attention); }
