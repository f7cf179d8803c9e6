// dev/cuda/graph_check.cu: are the CUDA backend's ops capturable? One decode step of a small
// Qwen2-like layer (embed, rmsnorm, qkv matmul with bias, rope_store and attention reading the
// start from device memory, o_proj, add_rmsnorm, gate|up, swiglu, down, add_rmsnorm, gather_rows,
// lm_head) plus a cuBLAS-path matmul (n = 16, with bias) is run eagerly at two starts, then
// captured once (cudaStreamCaptureModeGlobal: any allocation or synchronisation inside an op
// breaks the capture) and replayed with *start_d set to each start. Replays must match the eager
// runs, and the two starts must differ from each other.
//
//   build (after setup.py build_ext): see dev/cuda/run_device.sh
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vector>

#include "cuda/cuda_backend.cuh"

#define CKF(x)                                                                                      \
    do {                                                                                            \
        fl_status s_ = (x);                                                                         \
        if (s_ != FL_OK) { fprintf(stderr, "FAIL %s: %s\n", #x, fl_err_msg()); return 1; }           \
    } while (0)
#define CK(x)                                                                                       \
    do {                                                                                            \
        cudaError_t e_ = (x);                                                                       \
        if (e_ != cudaSuccess) { fprintf(stderr, "FAIL %s at line %d: %s\n", #x, __LINE__, cudaGetErrorString(e_)); return 1; } \
    } while (0)

static uint64_t rs = 88172645463325252ull;
static float frand() {  // uniform in [-1, 1)
    rs ^= rs << 13; rs ^= rs >> 7; rs ^= rs << 17;
    return (float)((rs >> 40) & 0xffffff) / 8388608.0f - 1.0f;
}

static fl_backend *be;
static fl_status upload_rand(void **d, size_t n, float scale, float offset) {
    std::vector<float> h(n);
    for (auto &v : h) v = offset + scale * frand();
    std::vector<uint16_t> b(n);
    FL_TRY(fl_convert(b.data(), be->act, h.data(), FL_F32, n));
    FL_TRY(be->alloc(be, n * 2, d));
    return be->to_backend(be, *d, b.data(), n * 2);
}
static fl_status download_f32(std::vector<float> &out, const void *d, size_t n) {
    std::vector<uint16_t> b(n);
    FL_TRY(be->to_host(be, b.data(), d, n * 2));
    out.resize(n);
    return fl_convert(out.data(), FL_F32, b.data(), be->act, n);
}

int main() {
    CKF(fl_backend_cuda_create(0, FL_BF16, &be));
    fl_cuda_impl *c = fl_cuda_impl_of(be);
    const int B = 2, d = 896, nh = 14, nkv = 2, hd = 64, ffn = 4864, V = 4000, L = 64, NB = 16;
    const int qw = (nh + 2 * nkv) * hd;
    const float sd = 1.0f / sqrtf((float)d);
    void *emb, *n1, *n2, *nf, *wqkv, *bqkv, *wo, *wgu, *wdn, *lm;
    CKF(upload_rand(&emb, (size_t)V * d, 1.0f, 0));
    CKF(upload_rand(&n1, d, 0.2f, 1.0f));
    CKF(upload_rand(&n2, d, 0.2f, 1.0f));
    CKF(upload_rand(&nf, d, 0.2f, 1.0f));
    CKF(upload_rand(&wqkv, (size_t)qw * d, sd, 0));
    CKF(upload_rand(&bqkv, qw, 0.5f, 0));
    CKF(upload_rand(&wo, (size_t)d * nh * hd, sd, 0));
    CKF(upload_rand(&wgu, (size_t)2 * ffn * d, sd, 0));
    CKF(upload_rand(&wdn, (size_t)d * ffn, 1.0f / sqrtf((float)ffn), 0));
    CKF(upload_rand(&lm, (size_t)V * d, sd, 0));
    auto W = [&](void *p, int64_t r, int64_t cc) { return fl_weight{be->act, r, cc, p, NULL, NULL, 0, 0}; };
    const fl_weight Wemb = W(emb, V, d), Wn1 = W(n1, d, 1), Wn2 = W(n2, d, 1), Wnf = W(nf, d, 1), Wqkv = W(wqkv, qw, d),
                    Bqkv = W(bqkv, qw, 1), Wo = W(wo, d, nh * hd), Wgu = W(wgu, 2 * ffn, d), Wdn = W(wdn, d, ffn),
                    Wlm = W(lm, V, d);
    void *x, *xn, *qkv, *att, *delta, *gu, *ff, *last, *logits, *bigx, *bigy, *kc, *vc, *kc0, *vc0;
    const size_t cache = (size_t)B * L * nkv * hd * 2;
    CKF(be->alloc(be, (size_t)B * d * 2, &x));
    CKF(be->alloc(be, (size_t)B * d * 2, &xn));
    CKF(be->alloc(be, (size_t)B * qw * 2, &qkv));
    CKF(be->alloc(be, (size_t)B * nh * hd * 2, &att));
    CKF(be->alloc(be, (size_t)B * d * 2, &delta));
    CKF(be->alloc(be, (size_t)B * 2 * ffn * 2, &gu));
    CKF(be->alloc(be, (size_t)B * ffn * 2, &ff));
    CKF(be->alloc(be, (size_t)B * d * 2, &last));
    CKF(be->alloc(be, (size_t)B * V * 2, &logits));
    CKF(upload_rand(&bigx, (size_t)NB * d, 1.0f, 0));
    CKF(be->alloc(be, (size_t)NB * qw * 2, &bigy));
    CKF(upload_rand(&kc0, cache / 2, 1.0f, 0));
    CKF(upload_rand(&vc0, cache / 2, 1.0f, 0));
    CKF(be->alloc(be, cache, &kc));
    CKF(be->alloc(be, cache, &vc));
    int32_t *tok, *pos, *start_d;
    float *inv;
    CKF(be->alloc(be, B * 4, (void **)&tok));
    CKF(be->alloc(be, B * 4, (void **)&pos));
    CKF(be->alloc(be, 4, (void **)&start_d));
    CKF(be->alloc(be, hd / 2 * 4, (void **)&inv));
    const int32_t toks[2] = {17, 3999};
    CKF(be->to_backend(be, tok, toks, sizeof toks));
    float invh[512];
    for (int i = 0; i < hd / 2; i++) invh[i] = 1.0f / powf(1e6f, (float)(2 * i) / hd);
    CKF(be->to_backend(be, inv, invh, hd / 2 * 4));
    void *kp[1] = {kc}, *vp[1] = {vc};
    fl_kvcache kv = {1, B, L, nkv, hd, be->act, kp, vp};
    const int32_t rows[2] = {1, 0};

    auto seq = [&](int host_start) -> fl_status {
        const fl_step s = {B, 1, host_start, start_d, pos, NULL, 0};
        FL_TRY(be->embed(be, x, tok, B, &Wemb));
        FL_TRY(be->rmsnorm(be, xn, x, &Wn1, B, 1e-6f));
        FL_TRY(be->matmul(be, qkv, xn, B, &Wqkv, &Bqkv));
        FL_TRY(be->rope_store(be, qkv, &s, &kv, 0, nh, inv, NULL, 0.f));
        FL_TRY(be->attention(be, att, qkv, &s, &kv, 0, nh, 0, 1.0f / sqrtf((float)hd), NULL));
        FL_TRY(be->matmul(be, delta, att, B, &Wo, NULL));
        FL_TRY(be->add_rmsnorm(be, xn, x, delta, &Wn2, B, 1e-6f));
        FL_TRY(be->matmul(be, gu, xn, B, &Wgu, NULL));
        FL_TRY(be->swiglu(be, ff, gu, B, ffn));
        FL_TRY(be->matmul(be, delta, ff, B, &Wdn, NULL));
        FL_TRY(be->add_rmsnorm(be, xn, x, delta, &Wnf, B, 1e-6f));
        FL_TRY(be->gather_rows(be, last, xn, rows, B, d));
        FL_TRY(be->matmul(be, logits, last, B, &Wlm, NULL));
        FL_TRY(be->matmul(be, bigy, bigx, NB, &Wqkv, &Bqkv));  // cuBLAS + bias kernel
        return FL_OK;
    };
    auto prepare = [&](int start) -> fl_status {  // pristine cache, device start and positions
        FL_CUDA_CHECK(cudaMemcpyAsync(kc, kc0, cache, cudaMemcpyDeviceToDevice, c->stream));
        FL_CUDA_CHECK(cudaMemcpyAsync(vc, vc0, cache, cudaMemcpyDeviceToDevice, c->stream));
        const int32_t p[2] = {start, start + 5};
        FL_TRY(be->to_backend(be, start_d, &start, 4));
        FL_TRY(be->to_backend(be, pos, p, 8));
        return be->sync(be);
    };
    struct Res { std::vector<float> logits, bigy, k; };
    auto collect = [&](Res &r) -> fl_status {
        FL_TRY(be->sync(be));
        FL_TRY(download_f32(r.logits, logits, (size_t)B * V));
        FL_TRY(download_f32(r.bigy, bigy, (size_t)NB * qw));
        return download_f32(r.k, kc, cache / 2);
    };
    const int starts[2] = {10, 33};
    Res eager[2], replay[2];
    for (int i = 0; i < 2; i++) {
        CKF(prepare(starts[i]));
        CKF(seq(starts[i]));
        CKF(collect(eager[i]));
    }
    CKF(prepare(0));
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeGlobal));
    const fl_status cap = seq(-999);  // the host start must not matter: start_d is read
    cudaError_t ce = cudaStreamEndCapture(c->stream, &g);
    if (cap != FL_OK) { fprintf(stderr, "FAIL an op failed under capture: %s\n", fl_err_msg()); return 1; }
    CK(ce);
    CK(cudaGraphInstantiate(&ge, g, 0));
    size_t nodes = 0;
    CK(cudaGraphGetNodes(g, NULL, &nodes));
    for (int i = 0; i < 2; i++) {
        CKF(prepare(starts[i]));
        CK(cudaGraphLaunch(ge, c->stream));
        CKF(collect(replay[i]));
    }
    int fails = 0;
    auto cmp = [&](const char *what, const std::vector<float> &a, const std::vector<float> &b, bool want_same) {
        double num = 0, den = 0;
        bool finite = true;
        for (size_t i = 0; i < a.size(); i++) {
            if (!std::isfinite(a[i]) || !std::isfinite(b[i])) finite = false;
            num += (double)(a[i] - b[i]) * (a[i] - b[i]);
            den += (double)b[i] * b[i];
        }
        const double rel = sqrt(num / (den > 0 ? den : 1));
        const bool ok = finite && (want_same ? rel < 1e-3 : rel > 1e-2);
        printf("%s %-40s rel-L2 %.3e (%s)\n", ok ? "ok  " : "FAIL", what, rel, want_same ? "replay vs eager" : "must differ");
        fails += !ok;
    };
    for (int i = 0; i < 2; i++) {
        char w[64];
        snprintf(w, sizeof w, "logits start=%d", starts[i]);
        cmp(w, replay[i].logits, eager[i].logits, true);
        snprintf(w, sizeof w, "k cache start=%d", starts[i]);
        cmp(w, replay[i].k, eager[i].k, true);
        snprintf(w, sizeof w, "cuBLAS n=16 + bias start=%d", starts[i]);
        cmp(w, replay[i].bigy, eager[i].bigy, true);
    }
    cmp("logits start=10 vs start=33", eager[0].logits, eager[1].logits, false);
    printf("graph: %zu nodes; backend memory %.1f MiB allocated, peak %.1f MiB\n", nodes, be->mem_allocated / 1048576.0,
           be->mem_peak / 1048576.0);
    cudaGraphExecDestroy(ge);
    cudaGraphDestroy(g);
    be->destroy(be);
    printf(fails ? "GRAPH CHECK FAILED (%d)\n" : "GRAPH CHECK PASSED\n", fails);
    return fails ? 2 : 0;
}
