"""The CUDA source of Philox4x32-10 and of the deformation kernel (CupyBackend._deform_rows).

PHILOX is philox.philox4x32 word for word: the products in 64 bits, their high and low halves
the round's words. deform_rows is deform.deform image by image, one block an image: its threads
draw the elastic fields into shared memory, smooth them along rows and then columns (smooth_pass,
a barrier between), and each reads its pixels' source points. Its float64 arithmetic follows the
reference's order; nvcc may fuse a multiply and an add into one rounding, and CUDA's sin and cos
are within 2 ulp of libm's, so its results agree with the CPU's within the bounds the tests
derive (tests/test_deform.py), not bit for bit.
"""

from xpnet.backends import deform, philox

PHILOX = f"""
__device__ void philox4x32_10(unsigned* c, unsigned k0, unsigned k1) {{
    for (int round = 0; round < {philox.ROUNDS}; ++round) {{
        if (round) {{ k0 += {philox.W0}u; k1 += {philox.W1}u; }}  // wraps modulo 2^32, as the key's bump does
        unsigned long long p0 = {philox.M0}ull * c[0], p1 = {philox.M1}ull * c[2];
        unsigned c1 = c[1], c3 = c[3];
        c[0] = (unsigned)(p1 >> 32) ^ c1 ^ k0;
        c[1] = (unsigned)p1;
        c[2] = (unsigned)(p0 >> 32) ^ c3 ^ k1;
        c[3] = (unsigned)p0;
    }}
}}
"""

DEFORM_SOURCE = (
    PHILOX
    + f"""
#define MAX_PIXELS {deform.MAX_SIDE * deform.MAX_SIDE}
#define STREAM {deform.DEFORM_STREAM}u
#define AFFINE_COUNTERS {deform.AFFINE_WORDS // 4}
"""
    + r"""
__device__ double symmetric(unsigned word) { return (double)(word >> 8) * 1.1920928955078125e-07 - 1.0; }

// One pass of the Gaussian over both fields, along rows or along columns, zero beyond the edges:
// out[q] = sum over k of weights[k] * in[q + (k - radius) * step], the taps in order.
__device__ void smooth_pass(double (*in)[MAX_PIXELS], double (*out)[MAX_PIXELS], const double* weights, int taps,
                            int side, bool along_rows) {
    int n = side * side, radius = taps / 2, step = along_rows ? 1 : side;
    for (int p = threadIdx.x; p < 2 * n; p += blockDim.x) {
        int f = p / n, q = p % n, position = along_rows ? q % side : q / side;
        double total = 0;
        for (int k = 0; k < taps; ++k) {
            int at = position + k - radius;
            total += weights[k] * (at >= 0 && at < side ? in[f][q + (k - radius) * step] : 0.0);
        }
        out[f][q] = total;
    }
}

template <typename T>
__device__ double read(const T* image, bool valid, int row, int column, int side, double background) {
    return valid && row >= 0 && row < side && column >= 0 && column < side ? (double)image[row * side + column]
                                                                           : background;
}

template <typename T>
__global__ void deform_rows(const T* source, const long long* rows, long long n_source, int side, double angle_range,
                            double scale_range, double shear_range, double shift_range, double alpha,
                            const double* weights, int taps, unsigned key0, unsigned key1, unsigned epoch,
                            double background, T* out) {
    __shared__ double field[2][MAX_PIXELS];
    __shared__ double smoothed[2][MAX_PIXELS];
    int n = side * side;
    long long row = rows[blockIdx.x];
    bool valid = row >= 0 && row < n_source;  // never read outside source: check_range reports the fault
    const T* image = source + (valid ? row : 0) * n;
    unsigned index = (unsigned)row;
    unsigned first[4] = {0u, index, STREAM, epoch}, second[4] = {1u, index, STREAM, epoch};
    philox4x32_10(first, key0, key1);
    philox4x32_10(second, key0, key1);
    double angle = angle_range * symmetric(first[0]);
    double scale_x = 1.0 + scale_range * symmetric(first[1]), scale_y = 1.0 + scale_range * symmetric(first[2]);
    double shear = shear_range * symmetric(first[3]);
    double shift_x = shift_range * symmetric(second[0]), shift_y = shift_range * symmetric(second[1]);
    double cos_angle = cos(angle), sin_angle = sin(angle), centre = (side - 1) / 2.0;
    if (alpha != 0) {  // the same for every thread of the block: all reach the barriers
        for (int c = threadIdx.x; c < (2 * n + 3) / 4; c += blockDim.x) {
            unsigned words[4] = {(unsigned)(AFFINE_COUNTERS + c), index, STREAM, epoch};
            philox4x32_10(words, key0, key1);
            for (int lane = 0; lane < 4 && 4 * c + lane < 2 * n; ++lane) {
                int k = 4 * c + lane;
                field[k / n][k % n] = symmetric(words[lane]);
            }
        }
        __syncthreads();
        smooth_pass(field, smoothed, weights, taps, side, true);
        __syncthreads();
        smooth_pass(smoothed, field, weights, taps, side, false);
        __syncthreads();
    }
    for (int q = threadIdx.x; q < n; q += blockDim.x) {
        int r = q / side, j = q % side;
        double v = r - centre, u = j - centre;
        double a = (u + shear * v) * scale_x, b = v * scale_y;
        double x = (cos_angle * a - sin_angle * b) + (centre + shift_x);
        double y = (sin_angle * a + cos_angle * b) + (centre + shift_y);
        if (alpha != 0) {
            x = x + alpha * field[0][q];
            y = y + alpha * field[1][q];
        }
        double x0 = floor(x), y0 = floor(y), fx = x - x0, fy = y - y0;
        int c0 = (int)x0, r0 = (int)y0;
        double top = (1 - fx) * read(image, valid, r0, c0, side, background) +
                     fx * read(image, valid, r0, c0 + 1, side, background);
        double bottom = (1 - fx) * read(image, valid, r0 + 1, c0, side, background) +
                        fx * read(image, valid, r0 + 1, c0 + 1, side, background);
        out[(long long)blockIdx.x * n + q] = (T)((1 - fy) * top + fy * bottom);
    }
}
"""
)
