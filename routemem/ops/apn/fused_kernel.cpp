// Fused CPU kernel for the APN patch mixture: each token's top-k patch outputs summed straight
// into its output row,
//
//     out_n = sum_j w_nj U_i phi_nj,   phi_nj = c_n * s_nj,   s_nj = sigmoid(a_i c_n + b_i),
//
// with i = idx[n, j] and the code c = V^T z computed outside (PyTorch differentiates z and V);
// so are the gates s [N, k, r] (a vectorised sigmoid). There is no [assignments, d] intermediate
// in memory (the grouped PyTorch form writes one and reads it back several times), and all of U,
// K*d*r values (512 KiB at K=64, d=128, r=16), stays in cache. Backward per assignment, with
// h = U_i^T g_n:
//     dw_nj = <h, phi_nj>,  dphi = w h,  dx = dphi * c * s (1 - s)   (x = a_i c + b_i),
//     dc_n += dphi * s + dx * a_i,  da_i += dx * c,  db_i += dx,  dU_i += w g_n phi_nj^T.
// U is passed transposed, Ut [K, r, d], so that the long inner loops run over d contiguous
// values. Tokens [begin, end) per call; dU, da, db go into the caller's per-thread slabs.

#include <cstdint>
#include <vector>

namespace {

// Written with GCC/Clang vector types (64 bytes; split in two where the CPU has only 32-byte
// registers): left to itself, the compiler kept the accumulators on the stack.
template <typename S> struct VecOf;
template <> struct VecOf<float> { typedef float type __attribute__((vector_size(64))); };
template <> struct VecOf<double> { typedef double type __attribute__((vector_size(64))); };
template <typename S> using Vec = typename VecOf<S>::type;

template <typename S>
inline Vec<S> load(const S* x) {
  Vec<S> v;
  __builtin_memcpy(&v, x, sizeof(v));  // unaligned
  return v;
}

template <typename S>
inline void store(S* x, Vec<S> v) { __builtin_memcpy(x, &v, sizeof(v)); }

// Four vectors of outputs accumulate in registers while the token's k*r terms stream past.
template <typename S>
void forward(const S* code, const int64_t* idx, const S* w, const S* gate, const S* Ut, int64_t k,
             int64_t d, int64_t r, S* out, int64_t begin, int64_t end) {
  constexpr int64_t lanes = sizeof(Vec<S>) / sizeof(S), block = 4 * lanes;
  std::vector<const S*> rows(k * r);  // row s of patch i_nj's Ut, per term (j, s)
  std::vector<S> terms(k * r);        // w_nj phi_nj, per term
  for (int64_t n = begin; n < end; ++n) {
    const S* c = code + n * r;
    for (int64_t j = 0; j < k; ++j)
      for (int64_t s = 0; s < r; ++s) {
        rows[j * r + s] = Ut + (idx[n * k + j] * r + s) * d;
        terms[j * r + s] = w[n * k + j] * c[s] * gate[(n * k + j) * r + s];
      }
    S* o = out + n * d;
    int64_t e0 = 0;
    for (; e0 + block <= d; e0 += block) {
      Vec<S> acc[4] = {};
      for (int64_t t = 0; t < k * r; ++t)
        for (int v = 0; v < 4; ++v) acc[v] += terms[t] * load(rows[t] + e0 + v * lanes);
      for (int v = 0; v < 4; ++v) store(o + e0 + v * lanes, acc[v]);
    }
    for (; e0 < d; ++e0) {  // the remainder when d is not a multiple of the block
      S acc = 0;
      for (int64_t t = 0; t < k * r; ++t) acc += terms[t] * rows[t][e0];
      o[e0] = acc;
    }
  }
}

// The assignments m = n * k + j of tokens [begin, end) sorted by patch (a counting sort,
// O(assignments)): patch i's are order[start[i] .. start[i + 1]). Backward visits them in this
// order so that one patch's rows of U and dU stay in L1 while its assignments stream past.
// (Forward stays token by token: there the output row, not U, would move per assignment.)
inline void by_patch(const int64_t* idx, int64_t K, int64_t k, int64_t begin, int64_t end,
                     std::vector<int64_t>& start, std::vector<int64_t>& order) {
  start.assign(K + 1, 0);
  order.resize((end - begin) * k);
  for (int64_t m = begin * k; m < end * k; ++m) ++start[idx[m] + 1];
  for (int64_t i = 0; i < K; ++i) start[i + 1] += start[i];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t m = begin * k; m < end * k; ++m) order[fill[idx[m]]++] = m;
}

// h_q = U_i^T g_q for G assignments of patch i, into h[q * r + s]. With r a multiple of the vector
// width (CH vectors), vectorised over r from U_i in [d, r] layout: each row of U_i is loaded once
// for all G and the sums stay in registers. Otherwise one dot product per (q, s) over d.
template <typename S, int G, int CH>
void codes_by_rows(const S* const* g, const S* Ui, int64_t d, int64_t r, S* h) {
  constexpr int64_t lanes = sizeof(Vec<S>) / sizeof(S);
  Vec<S> acc[G][CH] = {};
  for (int64_t e = 0; e < d; ++e)
    for (int c = 0; c < CH; ++c) {
      const Vec<S> u = load(Ui + e * r + c * lanes);
      for (int q = 0; q < G; ++q) acc[q][c] += g[q][e] * u;
    }
  for (int q = 0; q < G; ++q)
    for (int c = 0; c < CH; ++c) store(h + q * r + c * lanes, acc[q][c]);
}

template <typename S, int G>
void codes_by_dots(const S* const* g, const S* Uti, int64_t d, int64_t r, S* h) {
  constexpr int64_t lanes = sizeof(Vec<S>) / sizeof(S);
  for (int64_t s = 0; s < r; ++s) {
    const S* row = Uti + s * d;
    Vec<S> dots[G] = {};
    int64_t e = 0;
    for (; e + lanes <= d; e += lanes) {
      const Vec<S> u = load(row + e);
      for (int q = 0; q < G; ++q) dots[q] += u * load(g[q] + e);
    }
    for (int q = 0; q < G; ++q) {
      S sum = 0;
      for (int64_t v = 0; v < lanes; ++v) sum += dots[q][v];
      for (int64_t x = e; x < d; ++x) sum += row[x] * g[q][x];  // the remainder of d
      h[q * r + s] = sum;
    }
  }
}

// G assignments m[0..G) of the same patch i at once: each vector of U_i and of dU_i is loaded
// once for all G (and dU_i stored once), against G times one assignment at a time; the loads and
// stores, not the multiply-adds, bound this loop. h: scratch of G * r values.
template <typename S, int G>
void backward_group(const int64_t* m, int64_t i, const S* code, const S* w, const S* gate,
                    const S* U, const S* Ut, const S* a, const S* grad, int64_t k, int64_t d,
                    int64_t r, S* dcode, S* dw, S* dUt, S* da, S* db, S* h) {
  constexpr int64_t lanes = sizeof(Vec<S>) / sizeof(S);
  const S *g[G], *c[G], *sg[G];
  S dw_m[G] = {};
  for (int q = 0; q < G; ++q) {
    g[q] = grad + (m[q] / k) * d;
    c[q] = code + (m[q] / k) * r;
    sg[q] = gate + m[q] * r;
  }
  const S* Ui = U + i * d * r;
  if (r == lanes) codes_by_rows<S, G, 1>(g, Ui, d, r, h);
  else if (r == 2 * lanes) codes_by_rows<S, G, 2>(g, Ui, d, r, h);
  else if (r == 4 * lanes) codes_by_rows<S, G, 4>(g, Ui, d, r, h);
  else codes_by_dots<S, G>(g, Ut + i * r * d, d, r, h);
  for (int64_t s = 0; s < r; ++s) {
    S* drow = dUt + (i * r + s) * d;
    S phi[G], wphi[G];
    for (int q = 0; q < G; ++q) {
      phi[q] = c[q][s] * sg[q][s];
      wphi[q] = w[m[q]] * phi[q];
    }
    int64_t e = 0;
    for (; e + lanes <= d; e += lanes) {  // dU_i += w g phi^T (transposed layout)
      Vec<S> du = load(drow + e);
      for (int q = 0; q < G; ++q) du += wphi[q] * load(g[q] + e);
      store(drow + e, du);
    }
    for (; e < d; ++e)
      for (int q = 0; q < G; ++q) drow[e] += wphi[q] * g[q][e];
    for (int q = 0; q < G; ++q) {
      const S hs = h[q * r + s];
      dw_m[q] += hs * phi[q];
      const S dphi = w[m[q]] * hs;
      const S dx = dphi * c[q][s] * sg[q][s] * (S(1) - sg[q][s]);
      dcode[(m[q] / k) * r + s] += dphi * sg[q][s] + dx * a[i * r + s];
      da[i * r + s] += dx * c[q][s];
      db[i * r + s] += dx;
    }
  }
  for (int q = 0; q < G; ++q) dw[m[q]] = dw_m[q];
}

// Patch by patch, four assignments at a time. Tokens [begin, end) belong to this call, so their
// dcode rows have no other writer.
template <typename S>
void backward(const S* code, const int64_t* idx, const S* w, const S* gate, const S* U,
              const S* Ut, const S* a, const S* grad, int64_t K, int64_t k, int64_t d, int64_t r,
              S* dcode, S* dw, S* dUt, S* da, S* db, int64_t begin, int64_t end) {
  constexpr int G = 4;
  std::vector<int64_t> start, order;
  by_patch(idx, K, k, begin, end, start, order);
  std::vector<S> h(G * r);
  for (int64_t n = begin; n < end; ++n)
    for (int64_t s = 0; s < r; ++s) dcode[n * r + s] = 0;
  for (int64_t i = 0; i < K; ++i) {
    int64_t p = start[i];
    for (; p + G <= start[i + 1]; p += G)
      backward_group<S, G>(&order[p], i, code, w, gate, U, Ut, a, grad, k, d, r, dcode, dw, dUt,
                           da, db, h.data());
    for (; p < start[i + 1]; ++p)
      backward_group<S, 1>(&order[p], i, code, w, gate, U, Ut, a, grad, k, d, r, dcode, dw, dUt,
                           da, db, h.data());
  }
}

}  // namespace

#define ROUTEMEM_EXPORT(S, suffix)                                                                 \
  extern "C" void patch_forward_##suffix(const S* code, const int64_t* idx, const S* w,           \
                                         const S* gate, const S* Ut, int64_t k, int64_t d,        \
                                         int64_t r, S* out, int64_t begin, int64_t end) {         \
    forward<S>(code, idx, w, gate, Ut, k, d, r, out, begin, end);                                 \
  }                                                                                                \
  extern "C" void patch_backward_##suffix(                                                         \
      const S* code, const int64_t* idx, const S* w, const S* gate, const S* U, const S* Ut,      \
      const S* a, const S* grad, int64_t K, int64_t k, int64_t d, int64_t r, S* dcode, S* dw,     \
      S* dUt, S* da, S* db, int64_t begin, int64_t end) {                                          \
    backward<S>(code, idx, w, gate, U, Ut, a, grad, K, k, d, r, dcode, dw, dUt, da, db, begin,    \
                end);                                                                              \
  }

ROUTEMEM_EXPORT(float, f32)
ROUTEMEM_EXPORT(double, f64)
