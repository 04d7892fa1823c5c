// fastbp device functions: every activation beside its derivative, and the loss helpers.
//
// Written once and shared: kernels/cupy.py puts this file in front of fastbp_kernels.cu (one
// RawModule per dtype) and uses it as the preamble of its ElementwiseKernels, so the GPU has one
// definition of each function. Meanings match the NumPy reference backend (kernels/numpy.py)
// exactly. The codes (FB_SIGMOID, FB_MSE, FB_RULE_ADAM, FB_HP_LR, ...) and FB_LEAKY_SLOPE are not
// written here: kernels/cupy.py generates them as #defines from kernels/base.py (ACT_CODE,
// LOSS_CODE, RULE_CODE, HP_*) in front of this file. No #include: NVRTC compiles this without the
// host headers.

// Machine epsilon of T (numpy.finfo(T).eps): the clip that keeps logs and divisions finite.
template <typename T> struct fb_limits;
template <> struct fb_limits<float> {
    __device__ static float eps() { return 1.1920928955078125e-07f; }
};
template <> struct fb_limits<double> {
    __device__ static double eps() { return 2.220446049250313e-16; }
};

// a * b rounded once, never contracted into an FMA: the SGD update then rounds like NumPy's
// `tmp = grads * lr; params -= tmp`.
__device__ __forceinline__ float fb_mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double fb_mul_rn(double a, double b) { return __dmul_rn(a, b); }

// sigmoid(z) = exp(-log(1 + e^-z)) without overflow for any z (NaN stays NaN).
template <typename T>
__device__ __forceinline__ T fb_sigmoid(T z) {
    if (z >= T(0)) return T(1) / (T(1) + exp(-z));
    T e = exp(z);
    return e / (T(1) + e);
}

// log(1 + e^z), numpy.logaddexp(0, z): the stable form of -log(1 - sigmoid(z)).
template <typename T>
__device__ __forceinline__ T fb_softplus(T z) {
    T pos = z > T(0) ? z : T(0);
    return pos + log1p(exp(-fabs(z)));
}

// ---- elementwise activations: phi(z) beside phi'(z) --------------------------------------

template <typename T>
__device__ __forceinline__ T fb_act(int act, T z) {
    switch (act) {
        case FB_SIGMOID: return fb_sigmoid(z);
        case FB_TANH: return tanh(z);
        // `z < 0 ? 0 : z` keeps NaN, as numpy.maximum does (fmax would drop it).
        case FB_RELU: return z < T(0) ? T(0) : z;
        case FB_LEAKY_RELU: return z < T(0) ? T(FB_LEAKY_SLOPE) * z : z;
        default: return z;  // identity
    }
}

// phi'(z) from z and a = phi(z): sigmoid and tanh are cheapest from a, relu needs z.
// The caller multiplies, so an Inf or NaN delta stays non-finite where phi' is 0 (as in NumPy).
template <typename T>
__device__ __forceinline__ T fb_dact(int act, T z, T a) {
    switch (act) {
        case FB_SIGMOID: return (T(1) - a) * a;
        case FB_TANH: return T(1) - a * a;
        case FB_RELU: return z <= T(0) ? T(0) : T(1);
        case FB_LEAKY_RELU: return z <= T(0) ? T(FB_LEAKY_SLOPE) : T(1);
        default: return T(1);  // identity
    }
}

// a clipped into [eps, 1 - eps] (numpy.clip keeps NaN, so does this).
template <typename T>
__device__ __forceinline__ T fb_clip(T a) {
    const T lo = fb_limits<T>::eps(), hi = T(1) - fb_limits<T>::eps();
    return a < lo ? lo : (a > hi ? hi : a);
}
