#!/bin/bash
# Quantised experts on the dp2a GEMV: tests, Mixtral (4 of 32 layers) decode with FASTLOAD_MOE_QDP=1 / 0, dense regress.
source dev/cuda/ab_prelude.sh
( python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import gpu_bench; gpu_bench.make_checkpoint('/tmp/mixtral4', 'mixtral-8x7b', shards=3, num_hidden_layers=4)" > $OUT/mixckpt.log 2>&1; python3 dev/cuda/make_ckpt.py qwen7b > "$OUT/ckpt.log" 2>&1 ) &
mk=$!
OUT=$OUT STAGES="build" bash dev/cuda/verify_gpu.sh | tail -2
timeout 330 python3 -m pytest -q -p no:cacheprovider -n 8 -rfE tests/test_cuda_quant.py tests/test_cuda_engine.py::test_quantised_experts_on_gpu tests/test_cuda_engine.py::test_mixture_of_experts_through_the_engine > $OUT/pytest1.log 2>&1; tail -3 $OUT/pytest1.log
timeout 200 python3 -m pytest -q -p no:cacheprovider -n 8 -rfE tests/test_cuda_ops.py tests/test_cuda_model.py -k "moe or knob or mixtral" > $OUT/pytest2.log 2>&1; tail -3 $OUT/pytest2.log
wait $mk; tail -2 $OUT/mixckpt.log
for v in 1 0; do
  echo "== FASTLOAD_MOE_QDP=$v $(date +%T)"
  FASTLOAD_MOE_QDP=$v timeout 240 python3 benchmarks/moe_gpu.py --ckpt /tmp/mixtral4 --layers 4 --no-hf --quant int4,int8,nf4 \
      --out $OUT/moe_qdp$v.json 2>&1 | grep -v '^ ' | cut -c1-400
done
bw=$(copy_bw)
timeout 120 python3 dev/cuda/decode_ab.py --dir /tmp/fl_qwen7b --quant bf16,int4,int8,nf4 --bw-gbs $bw --label dense | tee -a $OUT/dense.jsonl | cut -c1-250
echo "== end $(date +%T)"
