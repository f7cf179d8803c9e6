source dev/cuda/ab_prelude.sh
OUT=$OUT STAGES="build" bash dev/cuda/verify_gpu.sh | tail -1
python3 dev/cuda/make_ckpt.py qwen7b > "$OUT/ckpt.log" 2>&1 &
ck=$!
for v in 1 0; do FASTLOAD_MOE_QDP=$v python3 .device/moe_dbg.py /tmp/wmix 2>&1 | tail -3; done
wait $ck
bw=$(copy_bw)
for r in 1 2; do for mo in int4 nf4; do timeout 60 python3 dev/cuda/decode_ab.py --dir /tmp/fl_qwen7b --quant $mo --bw-gbs $bw --label fresh-r$r | cut -c1-220; done; done
