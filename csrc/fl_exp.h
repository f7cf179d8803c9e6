/* fl_exp.h: exp(x) for x <= 0 in float32, for host loops that must vectorise (a libm call in a loop does not). */
#ifndef FL_EXP_H
#define FL_EXP_H
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Cephes' expf polynomial, within 2 ulp of expf for x in [-87, 0]; below -87 it gives ~1e-38 (callers that need an
 * exact 0 for -inf test for it themselves). GCC vectorises loops over it only with -fno-trapping-math (setup.py
 * passes it): otherwise the clamp's compare-and-select and floorf keep the loop scalar. Used by the CPU attention's
 * online softmax and the token logprobs' sum. */
static inline float fl_exp_nonpos(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, 4);
    return y * two_n;
}
#endif
