// fastbp CUDA kernels (compiled after activations.cu, one RawModule per dtype).
//
// Layout as in kernels/base.py: batches row-major (n_rows, width); W of a layer (n_out, n_in).
// Every kernel writes caller-owned buffers and allocates nothing, so any sequence of them can be
// captured into a CUDA graph. The name expressions kernels/cupy.py instantiates are listed by
// _kernel_names() there.

// ---- warp reductions (all 32 lanes must call them) ---------------------------------------

template <typename T>
__device__ __forceinline__ T fb_warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Max that propagates NaN, as numpy.max does.
template <typename T>
__device__ __forceinline__ T fb_max_nan(T a, T b) {
    return (b > a || b != b) ? b : a;
}

template <typename T>
__device__ __forceinline__ T fb_warp_max(T v) {
    for (int o = 16; o > 0; o >>= 1) v = fb_max_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// ---- tiled GEMM with fused epilogues ------------------------------------------------------
// C (M x N) = op(A) op(B), row-major. TA: A is stored (K x M) and transposed, else (M x K);
// TB: B is stored (N x K) and transposed, else (K x N). Block of 16 x 16 threads computing a
// BM x BN tile, (BM/16) x (BN/16) outputs per thread, K in steps of 16 through shared memory.
// Replaces a cuBLAS GEMM plus one elementwise kernel inside a captured training step.

#define FB_EPI_NONE 0      // C = alpha * acc + beta * C              (beta == 0: C not read)
#define FB_EPI_BIAS_ACT 1  // C = acc + bias[j]; aout = phi(C) when aout is not null
#define FB_EPI_DACT 2      // C = acc * phi'(ez, ea)                  (the hidden-layer delta)

template <typename T, int TA, int TB, int BM, int BN>
__global__ void fb_gemm(int M, int N, int K, const T* __restrict__ A, int lda,
                        const T* __restrict__ B, int ldb, T* C, int ldc, T alpha, T beta,
                        int epi, int act, const T* bias, const T* ez, const T* ea, T* aout) {
    const int BK = 16;
    const int TM = BM / 16, TN = BN / 16;
    __shared__ T As[BK][BM + 1];
    __shared__ T Bs[BK][BN + 1];
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 16 + tx;
    const int row0 = blockIdx.y * BM, col0 = blockIdx.x * BN;

    T acc[TM][TN];
    for (int i = 0; i < TM; ++i)
        for (int j = 0; j < TN; ++j) acc[i][j] = T(0);

    for (int k0 = 0; k0 < K; k0 += BK) {
        // Consecutive threads read consecutive addresses whichever way A and B are stored.
        for (int e = tid; e < BM * BK; e += 256) {
            int r, c;
            if (TA) { c = e / BM; r = e % BM; } else { r = e / BK; c = e % BK; }
            const int gi = row0 + r, gk = k0 + c;
            T v = T(0);
            if (gi < M && gk < K)
                v = TA ? A[(long long)gk * lda + gi] : A[(long long)gi * lda + gk];
            As[c][r] = v;
        }
        for (int e = tid; e < BN * BK; e += 256) {
            int j, c;
            if (TB) { j = e / BK; c = e % BK; } else { c = e / BN; j = e % BN; }
            const int gj = col0 + j, gk = k0 + c;
            T v = T(0);
            if (gj < N && gk < K)
                v = TB ? B[(long long)gj * ldb + gk] : B[(long long)gk * ldb + gj];
            Bs[c][j] = v;
        }
        __syncthreads();
#pragma unroll
        for (int c = 0; c < BK; ++c) {
            T a[TM], b[TN];
            for (int i = 0; i < TM; ++i) a[i] = As[c][ty + 16 * i];
            for (int j = 0; j < TN; ++j) b[j] = Bs[c][tx + 16 * j];
            for (int i = 0; i < TM; ++i)
                for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }

    for (int i = 0; i < TM; ++i) {
        const int gi = row0 + ty + 16 * i;
        if (gi >= M) continue;
        for (int j = 0; j < TN; ++j) {
            const int gj = col0 + tx + 16 * j;
            if (gj >= N) continue;
            const long long idx = (long long)gi * ldc + gj;
            const T v = acc[i][j];
            if (epi == FB_EPI_BIAS_ACT) {
                const T z = v + bias[gj];
                C[idx] = z;
                if (aout) aout[idx] = fb_act(act, z);
            } else if (epi == FB_EPI_DACT) {
                C[idx] = v * fb_dact(act, ez[idx], ea[idx]);
            } else {
                C[idx] = beta == T(0) ? alpha * v : alpha * v + beta * C[idx];
            }
        }
    }
}

// ---- elementwise epilogues (after a cuBLAS GEMM) ------------------------------------------

// Z += bias (per column); A = phi(Z) when A is not null. Replaces add_bias + activation.
template <typename T>
__global__ void fb_bias_act(T* Z, const T* bias, T* A, long long total, int k, int act) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const T z = Z[i] + bias[i % k];
        Z[i] = z;
        if (A) A[i] = fb_act(act, z);
    }
}

// D = phi'(Z, A) (.) D in place: the hidden-layer delta once D holds delta_next @ W_next.
template <typename T>
__global__ void fb_dact_inplace(T* D, const T* Z, const T* A, long long total, int act) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x)
        D[i] = D[i] * fb_dact(act, Z[i], A[i]);
}

// ---- row-wise kernels: one warp per row, blockDim.x a multiple of 32 -----------------------

// A = softmax(Z) per row.
template <typename T>
__global__ void fb_softmax_rows(const T* Z, T* A, int m, int k) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= m) return;  // the whole warp leaves together
    const T* z = Z + (long long)row * k;
    T* a = A + (long long)row * k;
    T mx = z[0];
    for (int j = lane; j < k; j += 32) mx = fb_max_nan(mx, z[j]);
    mx = fb_warp_max(mx);
    T s = T(0);
    for (int j = lane; j < k; j += 32) s += exp(z[j] - mx);
    s = fb_warp_sum(s);
    for (int j = lane; j < k; j += 32) a[j] = exp(z[j] - mx) / s;
}

// D = J_softmax^T D per row = A (.) (D - <A, D>).
template <typename T>
__global__ void fb_softmax_backward_rows(const T* A, T* D, int m, int k) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= m) return;
    const T* a = A + (long long)row * k;
    T* d = D + (long long)row * k;
    T dot = T(0);
    for (int j = lane; j < k; j += 32) dot += a[j] * d[j];
    dot = fb_warp_sum(dot);
    for (int j = lane; j < k; j += 32) d[j] = (d[j] - dot) * a[j];
}

// Fused output layer: D = dC/dz per example (when D is not null) and row_loss = the cost of
// each example. Replaces loss + dC/da + activation_backward. From the logits where the loss
// allows (sigmoid + log_loss, softmax + cross_entropy); otherwise dC/da on the clipped
// activation, then phi' (a vector-Jacobian product for softmax).
template <typename T>
__global__ void fb_output_delta(const T* Z, const T* A, const T* Y, T* D, T* row_loss, int m,
                                int k, int out_act, int loss) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= m) return;
    const long long base = (long long)row * k;
    const T *z = Z + base, *a = A + base, *y = Y + base;
    T* d = D ? D + base : nullptr;
    T total = T(0);

    if (loss == FB_LOG_LOSS && out_act == FB_SIGMOID) {
        // c = (1 - y) softplus(z) + y softplus(-z): no cancellation; dc/dz = a - y exactly
        for (int j = lane; j < k; j += 32) {
            total += fb_softplus(z[j]) * (T(1) - y[j]) + fb_softplus(-z[j]) * y[j];
            if (d) d[j] = a[j] - y[j];
        }
    } else if (loss == FB_CROSS_ENTROPY && out_act == FB_SOFTMAX) {
        // c = sum_j y_j (log sum exp(z - max) - (z_j - max)): no cancellation against max;
        // dc/dz = a sum(y) - y
        T mx = z[0];
        for (int j = lane; j < k; j += 32) mx = fb_max_nan(mx, z[j]);
        mx = fb_warp_max(mx);
        T s = T(0), ysum = T(0);
        for (int j = lane; j < k; j += 32) {
            s += exp(z[j] - mx);
            ysum += y[j];
        }
        s = fb_warp_sum(s);
        ysum = fb_warp_sum(ysum);
        const T lse = log(s);
        for (int j = lane; j < k; j += 32) {
            total += (lse - (z[j] - mx)) * y[j];
            if (d) d[j] = a[j] * ysum - y[j];
        }
    } else {
        for (int j = lane; j < k; j += 32) {
            T g;
            if (loss == FB_MSE) {  // c = 1/2 |a - y|^2, dc/da = a - y
                g = a[j] - y[j];
                total += g * g;
            } else if (loss == FB_LOG_LOSS) {  // dc/da = (a - y) / (a (1 - a))
                const T ac = fb_clip(a[j]);
                total += log(ac) * y[j] + log(T(1) - ac) * (T(1) - y[j]);
                g = (ac - y[j]) / ((T(1) - ac) * ac);
                if (a[j] != ac) g = T(0);  // the cost saw the clipped a: flat there
            } else {  // cross_entropy: dc/da = -y / a
                const T ac = fb_clip(a[j]);
                total += log(ac) * y[j];
                g = -(y[j] / ac);
                if (a[j] != ac) g = T(0);
            }
            if (d) d[j] = out_act == FB_SOFTMAX ? g : g * fb_dact(out_act, z[j], a[j]);
        }
        if (d && out_act == FB_SOFTMAX) {
            T dot = T(0);
            for (int j = lane; j < k; j += 32) dot += a[j] * d[j];
            dot = fb_warp_sum(dot);
            for (int j = lane; j < k; j += 32) d[j] = (d[j] - dot) * a[j];
        }
        total = loss == FB_MSE ? total : -total;
    }
    total = fb_warp_sum(total);
    if (lane == 0) row_loss[row] = loss == FB_MSE ? T(0.5) * total : total;
}

// ---- reductions and updates ----------------------------------------------------------------

// out (+)= alpha * D.sum(axis=0). Block (32, 8): 32 columns, 8 row groups reduced in shared memory.
template <typename T>
__global__ void fb_bias_grad(const T* D, T* out, int m, int k, T alpha, int accumulate) {
    __shared__ T part[8][33];
    const int col = blockIdx.x * 32 + threadIdx.x;
    T s = T(0);
    if (col < k)
        for (int r = threadIdx.y; r < m; r += 8) s += D[(long long)r * k + col];
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && col < k) {
        T t = T(0);
        for (int q = 0; q < 8; ++q) t += part[q][threadIdx.x];
        t = alpha * t;
        out[col] = accumulate ? out[col] + t : t;
    }
}

// Copies batch number *counter (rows counter*stride .. +m) of the data set into the step's own
// buffers. The data set's addresses come from `table` (set once per epoch), so one captured
// graph serves every batch of every epoch.
template <typename T>
__global__ void fb_gather_batch(const unsigned long long* table, const int* counter, T* xs, T* ys,
                                int stride, int m, int n_in, int n_out) {
    const T* X = reinterpret_cast<const T*>(table[0]);
    const T* Y = reinterpret_cast<const T*>(table[1]);
    const long long row0 = (long long)counter[0] * stride;
    const long long nx = (long long)m * n_in, ny = (long long)m * n_out;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < nx + ny;
         i += (long long)gridDim.x * blockDim.x) {
        if (i < nx)
            xs[i] = X[row0 * n_in + i];
        else
            ys[i - nx] = Y[row0 * n_out + (i - nx)];
    }
}

// One block of 256 threads. Adds the batch cost to status[0] and its size to status[1], unless
// the cost is not finite: then status[2] = 1 and every later update of the epoch is skipped
// (the early stop of Backend.train_epoch without a host sync per batch). Advances *counter.
template <typename T>
__global__ void fb_accumulate_loss(const T* row_loss, int m, double* status, int* counter) {
    __shared__ double part[256];
    double s = 0.0;
    for (int i = threadIdx.x; i < m; i += 256) s += (double)row_loss[i];
    part[threadIdx.x] = s;
    __syncthreads();
    for (int w = 128; w > 0; w >>= 1) {
        if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        const T batch = (T)part[0];  // the cost in T, as the NumPy path computes it
        if (status[2] == 0.0) {
            if (isfinite(batch)) {
                status[0] += (double)batch;
                status[1] += (double)m;
            } else {
                status[2] = 1.0;
            }
        }
        counter[0] += 1;
    }
}

// params -= lr * grads over the flat buffers; skipped once status[2] says the epoch stopped.
template <typename T>
__global__ void fb_sgd(T* p, const T* g, long long n, const T* lr, const double* status) {
    if (status && status[2] != 0.0) return;
    const T r = lr[0];
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        p[i] = p[i] - fb_mul_rn(g[i], r);
}
