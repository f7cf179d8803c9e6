#!/bin/bash
# Quantised Mixtral experts at decode batches above 4 (the dp2a GEMV's MOE form taking an expert's slots N at a time):
# the MoE / fusion GPU tests, then benchmarks/moe_gpu.py on 4 of Mixtral-8x7B's 32 layers at batches 1 and BATCHES
# with FASTLOAD_MOE_QDP (or MOE_KNOB) in MOE_SETTINGS (1: the dp2a form, 0: the float kernel), and the dense int4 / nf4 decode
# (the kernel's dense instantiations, each in a fresh process, bf16 beside them) when DENSE=1. TESTS=all: the whole GPU
# suite instead of the MoE / fusion tests; TESTS=0: none.
#   OUT=$OUT MOE_SETTINGS="1 0" BATCHES=4,8,16 bash dev/cuda/moe_batches.sh         carry [".devobj"]
#   OUT=$OUT MOE_KNOB=FASTLOAD_MOE_QDP_ROWS MOE_SETTINGS="4 2 4 2" QUANT=int4,int8 bash dev/cuda/moe_batches.sh
source dev/cuda/ab_prelude.sh
( python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import gpu_bench; gpu_bench.make_checkpoint('/tmp/mixtral4', 'mixtral-8x7b', shards=3, num_hidden_layers=4)" > $OUT/mixckpt.log 2>&1
  [ "${DENSE:-0}" = 1 ] && python3 dev/cuda/make_ckpt.py qwen7b > "$OUT/ckpt.log" 2>&1 ) &
mk=$!
if [ "${TESTS:-1}" = all ]; then  # the whole GPU suite (verify_gpu.sh's tests stage)
  OUT=$OUT STAGES="build tests" TESTS= bash dev/cuda/verify_gpu.sh | tail -12  # TESTS= : verify_gpu's own list
else
  OUT=$OUT STAGES="build" bash dev/cuda/verify_gpu.sh | tail -1
fi
if [ "${TESTS:-1}" = 1 ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider -n 8 -rfE tests/test_cuda_quant.py -k "experts or qx_fuse or att_fuse" \
      tests/test_cuda_engine.py::test_quantised_experts_on_gpu tests/test_cuda_engine.py::test_mixture_of_experts_through_the_engine \
      tests/test_cuda_ops.py::test_knob_errors > $OUT/pytest.log 2>&1; tail -1 $OUT/pytest.log; grep -E "^(FAILED|ERROR)" $OUT/pytest.log | head
fi
wait $mk; tail -1 $OUT/mixckpt.log | cut -c1-200
k=0
knob=${MOE_KNOB:-FASTLOAD_MOE_QDP}
for v in ${MOE_SETTINGS:-1 0}; do
  k=$((k + 1))
  echo "== $knob=$v (run $k) $(date +%T)"
  env $knob=$v timeout ${MOE_S:-240} python3 benchmarks/moe_gpu.py --ckpt /tmp/mixtral4 --layers 4 --no-hf \
      --quant ${QUANT:-int4,int8,nf4} --batches ${BATCHES:-4,8,16} --out $OUT/moe_${knob#FASTLOAD_}_${v}_$k.json 2>&1 | grep -E "^(int|nf|bf|batch|load|Trace|[A-Za-z]*Error)" | cut -c1-300
done
if [ "${DENSE:-0}" = 1 ]; then
  bw=$(copy_bw)
  for q in bf16 int4 nf4; do
    timeout 100 python3 dev/cuda/decode_ab.py --dir /tmp/fl_qwen7b --quant $q --bw-gbs $bw --label dense | tee -a $OUT/dense.jsonl | cut -c1-200
  done
fi
echo "== end $(date +%T)"
