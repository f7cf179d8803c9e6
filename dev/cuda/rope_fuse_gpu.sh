#!/bin/bash
# One device call (~140 s cold, with the carried .devobj): build, the GPU tests the rope fusion touched (golden, int8 x,
# run_op rope_attention three times), THUDM's ChatGLM2 code against fastload on the tiny fixture, then ChatGLM2-6B fp16
# decode b1 with THUDM's code as the peer and with FASTLOAD_ROPE_FUSE=0 / 1 (benchmarks/results/rope-fuse-2026-12-03-h200/).
#   run: bash dev/cuda/rope_fuse_gpu.sh                        carry [".devobj", ".thudm"] (THUDM's files: tools/chatglm_vs_thudm.py)
export PATH="$PATH:/usr/local/cuda/bin" PYTHONPATH=$PWD FASTLOAD_SKIP_DEMO=1 FASTLOAD_COMMIT=c0a6223 PYTHONUNBUFFERED=1
source dev/cuda/use_objs.sh; FASTLOAD_CUDA=1 FASTLOAD_CUDA_ARCHS=90 python3 setup.py -q build_ext --inplace > $OUT/build.log 2>&1 || tail -20 $OUT/build.log
(python3 dev/cuda/make_ckpt.py glm > $OUT/ckpt.log 2>&1; echo done >> $OUT/ckpt.log) &
python3 -m pytest -q -p no:cacheprovider -n 8 -rfE tests/test_cuda_model.py tests/test_cuda_quant.py -k "golden or int8_x" > $OUT/pytest1.log 2>&1; tail -3 $OUT/pytest1.log
for i in 1 2 3; do python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_cuda_ops.py -k rope_attention 2>&1 | tail -1; done
timeout 120 python3 tools/chatglm_vs_thudm.py --thudm .thudm/chatglm2 --model tests/fixtures/chatglm/chatglm2_st 2>&1 | tail -8
while ! grep -q done $OUT/ckpt.log; do sleep 3; done; tail -2 $OUT/ckpt.log
timeout 200 python3 benchmarks/chatglm_gpu.py --ckpt /tmp/glm_st --thudm .thudm/chatglm2 --out $OUT/chatglm_gpu.json 2>&1 | tail -4
for f in 0 1; do FASTLOAD_ROPE_FUSE=$f timeout 60 python3 benchmarks/chatglm_gpu.py --ckpt /tmp/glm_st --out $OUT/glm_fuse$f.json 2>&1 | grep "decode b1" | sed "s/^/[fuse $f] /"; done
