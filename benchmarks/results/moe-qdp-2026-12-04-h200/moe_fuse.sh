source dev/cuda/ab_prelude.sh
( python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import gpu_bench; gpu_bench.make_checkpoint('/tmp/mixtral4', 'mixtral-8x7b', shards=3, num_hidden_layers=4)" > $OUT/mixckpt.log 2>&1 ) &
mk=$!
OUT=$OUT STAGES="build" bash dev/cuda/verify_gpu.sh | tail -1
timeout 150 python3 -m pytest -q -p no:cacheprovider -n 8 -rfE tests/test_cuda_quant.py -k "experts or qx_fuse or att_fuse" tests/test_cuda_engine.py::test_quantised_experts_on_gpu tests/test_cuda_ops.py::test_knob_errors > $OUT/pytest.log 2>&1; tail -4 $OUT/pytest.log
wait $mk
for v in 1 0 1 0; do
  FASTLOAD_QX_FUSE=$v timeout 100 python3 benchmarks/moe_gpu.py --ckpt /tmp/mixtral4 --layers 4 --no-hf --quant int4,nf4 --out $OUT/moe_fuse$v.json 2>&1 | grep -E '^(int4|nf4|load)' | sed "s/^/QX_FUSE=$v /"
done
