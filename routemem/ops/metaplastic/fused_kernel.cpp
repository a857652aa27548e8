// Fused CPU kernel for metaplastic attention: one sequential scan per (batch, head) that keeps the
// [Dv, Dk] states in cache, instead of materialising every step's states in memory as the chunked
// PyTorch form must (its cost is memory traffic, not arithmetic).
//
// Linear form (see chunk.py): M = mu * I and J = I - prior obey
//     M_t = a_t M_{t-1} + v_t k_t^T,   J_t = a_t J_{t-1} + beta_t (k_t^2)^T,   a_t = exp(log_alpha_t)
//     o_t = scale * (M_t / (J_t + prior)) q_t,   u_t = scale^2 * (1 / (J_t + prior)) q_t^2.
// Forward stores the states at every chunk start; backward rebuilds one chunk's per-step states
// from there and runs the adjoint recurrence backwards (lM, lJ: adjoints of M_t and J_t):
//     lM_t = a_{t+1} lM_{t+1} + dM_t(direct),   lJ_t = a_{t+1} lJ_{t+1} + dJ_t(direct),
//     dlog_alpha_t = a_t (<lM_t, M_{t-1}> + <lJ_t, J_{t-1}>).
//
// Layouts (all contiguous): q, k [B,T,H,Dk]; v, beta, o, u [B,T,H,Dv]; log_alpha [B,T,H];
// prior [H]; M0, J0 [B,H,Dv,Dk]; starts [B,H,N+1,2,Dv,Dk] with N = ceil(T / C).
// Each call handles the (batch, head) rows [bh_begin, bh_end): Python runs disjoint ranges on
// threads (ctypes releases the GIL), so there is no threading in here.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct Dims {
  int64_t B, T, H, Dk, Dv, C;
  int64_t chunks() const { return (T + C - 1) / C; }
  int64_t qk(int64_t b, int64_t t, int64_t h) const { return ((b * T + t) * H + h) * Dk; }
  int64_t vb(int64_t b, int64_t t, int64_t h) const { return ((b * T + t) * H + h) * Dv; }
  int64_t step(int64_t b, int64_t t, int64_t h) const { return (b * T + t) * H + h; }
  int64_t cell() const { return Dv * Dk; }
};

// One step of both recurrences, in place: S = a S + outer(x, y) for (M: v, k) and (J: beta, k^2).
template <typename S>
inline void update(S* M, S* J, const S* prevM, const S* prevJ, S a, const S* v, const S* beta,
                   const S* k, const S* k2, const Dims& d) {
  for (int64_t i = 0; i < d.Dv; ++i) {
    const S vi = v[i], bi = beta[i];
    const S* pm = prevM + i * d.Dk;
    const S* pj = prevJ + i * d.Dk;
    S* m = M + i * d.Dk;
    S* j = J + i * d.Dk;
#pragma omp simd
    for (int64_t c = 0; c < d.Dk; ++c) {
      m[c] = a * pm[c] + vi * k[c];
      j[c] = a * pj[c] + bi * k2[c];
    }
  }
}

template <typename S>
void forward(const S* q, const S* k, const S* v, const S* beta, const S* log_alpha, const S* prior,
             const S* M0, const S* J0, S scale, Dims d, int with_unc, S* o, S* u, S* starts,
             int64_t bh_begin, int64_t bh_end) {
  const int64_t cell = d.cell(), N = d.chunks();
  std::vector<S> M(cell), J(cell), k2(d.Dk), q2(d.Dk);
  for (int64_t bh = bh_begin; bh < bh_end; ++bh) {
    const int64_t b = bh / d.H, h = bh % d.H;
    const S p = prior[h];
    S* st = starts + bh * (N + 1) * 2 * cell;
    std::memcpy(M.data(), M0 + bh * cell, cell * sizeof(S));
    std::memcpy(J.data(), J0 + bh * cell, cell * sizeof(S));
    for (int64_t t = 0; t < d.T; ++t) {
      if (t % d.C == 0) {
        std::memcpy(st + (t / d.C) * 2 * cell, M.data(), cell * sizeof(S));
        std::memcpy(st + (t / d.C) * 2 * cell + cell, J.data(), cell * sizeof(S));
      }
      const S* qt = q + d.qk(b, t, h);
      const S* kt = k + d.qk(b, t, h);
      for (int64_t c = 0; c < d.Dk; ++c) {
        k2[c] = kt[c] * kt[c];
        q2[c] = qt[c] * qt[c];
      }
      const S a = std::exp(log_alpha[d.step(b, t, h)]);
      update(M.data(), J.data(), M.data(), J.data(), a, v + d.vb(b, t, h), beta + d.vb(b, t, h),
             kt, k2.data(), d);
      S* ot = o + d.vb(b, t, h);
      for (int64_t i = 0; i < d.Dv; ++i) {
        const S* m = M.data() + i * d.Dk;
        const S* j = J.data() + i * d.Dk;
        S acc = 0, acc_u = 0;
#pragma omp simd reduction(+ : acc, acc_u)
        for (int64_t c = 0; c < d.Dk; ++c) {
          const S inv = S(1) / (j[c] + p);
          acc += m[c] * inv * qt[c];
          acc_u += inv * q2[c];
        }
        ot[i] = scale * acc;
        if (with_unc) u[d.vb(b, t, h) + i] = scale * scale * acc_u;
      }
    }
    std::memcpy(st + N * 2 * cell, M.data(), cell * sizeof(S));
    std::memcpy(st + N * 2 * cell + cell, J.data(), cell * sizeof(S));
  }
}

// Gradients of every input. dM_T / dJ_T may be null (no gradient for the final state); du is null
// without the uncertainty output. dprior_bh gets one partial sum per (batch, head).
template <typename S>
void backward(const S* q, const S* k, const S* v, const S* beta, const S* log_alpha, const S* prior,
              const S* starts, S scale, Dims d, const S* dout, const S* du, const S* dM_T,
              const S* dJ_T, S* dq, S* dk, S* dv, S* dbeta, S* dlog_alpha, S* dM0, S* dJ0,
              S* dprior_bh, int64_t bh_begin, int64_t bh_end) {
  const int64_t cell = d.cell(), N = d.chunks();
  std::vector<S> Ms(d.C * cell), Js(d.C * cell), lM(cell), lJ(cell), k2(d.Dk), q2(d.Dk);
  for (int64_t bh = bh_begin; bh < bh_end; ++bh) {
    const int64_t b = bh / d.H, h = bh % d.H;
    const S p = prior[h];
    const S* st = starts + bh * (N + 1) * 2 * cell;
    if (dM_T) std::memcpy(lM.data(), dM_T + bh * cell, cell * sizeof(S));
    else std::fill(lM.begin(), lM.end(), S(0));
    if (dJ_T) std::memcpy(lJ.data(), dJ_T + bh * cell, cell * sizeof(S));
    else std::fill(lJ.begin(), lJ.end(), S(0));
    double dp = 0;
    for (int64_t n = N - 1; n >= 0; --n) {
      const int64_t t0 = n * d.C, L = std::min(d.C, d.T - t0);
      const S* startM = st + n * 2 * cell;
      const S* startJ = startM + cell;
      for (int64_t s = 0; s < L; ++s) {  // rebuild this chunk's per-step states
        const int64_t t = t0 + s;
        const S* kt = k + d.qk(b, t, h);
        for (int64_t c = 0; c < d.Dk; ++c) k2[c] = kt[c] * kt[c];
        update(Ms.data() + s * cell, Js.data() + s * cell,
               s ? Ms.data() + (s - 1) * cell : startM, s ? Js.data() + (s - 1) * cell : startJ,
               S(std::exp(log_alpha[d.step(b, t, h)])), v + d.vb(b, t, h), beta + d.vb(b, t, h),
               kt, k2.data(), d);
      }
      for (int64_t s = L - 1; s >= 0; --s) {
        const int64_t t = t0 + s;
        const S a = std::exp(log_alpha[d.step(b, t, h)]);
        const S *qt = q + d.qk(b, t, h), *kt = k + d.qk(b, t, h);
        const S *vt = v + d.vb(b, t, h), *bt = beta + d.vb(b, t, h);
        S *dqt = dq + d.qk(b, t, h), *dkt = dk + d.qk(b, t, h);
        for (int64_t c = 0; c < d.Dk; ++c) {
          k2[c] = kt[c] * kt[c];
          q2[c] = qt[c] * qt[c];
          dqt[c] = 0;
          dkt[c] = 0;
        }
        const S* Mt = Ms.data() + s * cell;
        const S* Jt = Js.data() + s * cell;
        const S* prevM = s ? Mt - cell : startM;
        const S* prevJ = s ? Jt - cell : startJ;
        S da = 0;
        for (int64_t i = 0; i < d.Dv; ++i) {
          const S g_o = scale * dout[d.vb(b, t, h) + i];
          const S g_u = du ? scale * scale * du[d.vb(b, t, h) + i] : S(0);
          const S vi = vt[i], bi = bt[i];
          const int64_t row = i * d.Dk;
          S dv_i = 0, db_i = 0, dp_i = 0;
#pragma omp simd reduction(+ : dv_i, db_i, dp_i, da)
          for (int64_t c = 0; c < d.Dk; ++c) {
            const S inv = S(1) / (Jt[row + c] + p);
            const S R = Mt[row + c] * inv;  // mu
            const S gR = g_o * qt[c];
            const S gI = -gR * R * inv - g_u * q2[c] * inv * inv;  // direct dL/dI_t
            const S lm = lM[row + c] + gR * inv;
            const S lj = lJ[row + c] + gI;
            dqt[c] += g_o * R + S(2) * g_u * qt[c] * inv;
            dkt[c] += lm * vi + S(2) * kt[c] * lj * bi;
            dv_i += lm * kt[c];
            db_i += lj * k2[c];
            dp_i += gI;
            da += lm * prevM[row + c] + lj * prevJ[row + c];
            lM[row + c] = a * lm;
            lJ[row + c] = a * lj;
          }
          dv[d.vb(b, t, h) + i] = dv_i;
          dbeta[d.vb(b, t, h) + i] = db_i;
          dp += dp_i;
        }
        dlog_alpha[d.step(b, t, h)] = a * da;
      }
    }
    std::memcpy(dM0 + bh * cell, lM.data(), cell * sizeof(S));
    std::memcpy(dJ0 + bh * cell, lJ.data(), cell * sizeof(S));
    dprior_bh[bh] = S(dp);
  }
}

}  // namespace

#define ROUTEMEM_EXPORT(S, suffix)                                                                 \
  extern "C" void metaplastic_forward_##suffix(                                                    \
      const S* q, const S* k, const S* v, const S* beta, const S* log_alpha, const S* prior,      \
      const S* M0, const S* J0, double scale, int64_t B, int64_t T, int64_t H, int64_t Dk,         \
      int64_t Dv, int64_t C, int with_unc, S* o, S* u, S* starts, int64_t bh_begin,              \
      int64_t bh_end) {                                                                            \
    forward<S>(q, k, v, beta, log_alpha, prior, M0, J0, S(scale), Dims{B, T, H, Dk, Dv, C},       \
               with_unc, o, u, starts, bh_begin, bh_end);                                          \
  }                                                                                                \
  extern "C" void metaplastic_backward_##suffix(                                                   \
      const S* q, const S* k, const S* v, const S* beta, const S* log_alpha, const S* prior,      \
      const S* starts, double scale, int64_t B, int64_t T, int64_t H, int64_t Dk, int64_t Dv,     \
      int64_t C, const S* dout, const S* du, const S* dM_T, const S* dJ_T, S* dq, S* dk, S* dv,  \
      S* dbeta, S* dlog_alpha, S* dM0, S* dJ0, S* dprior_bh, int64_t bh_begin, int64_t bh_end) {  \
    backward<S>(q, k, v, beta, log_alpha, prior, starts, S(scale), Dims{B, T, H, Dk, Dv, C}, dout, \
                du, dM_T, dJ_T, dq, dk, dv, dbeta, dlog_alpha, dM0, dJ0, dprior_bh, bh_begin,      \
                bh_end);                                                                           \
  }

ROUTEMEM_EXPORT(float, f32)
ROUTEMEM_EXPORT(double, f64)
