/* cpu_qmatmul_bench.c: the CPU backend's quantised matmul on the demo model's shapes (SmolLM2-135M as the
 * Q4_1 GGUF becomes: bits 4, min form, group 32, fp16 s and m; the tied Q8_0 embedding as lm_head: bits 8,
 * symmetric, group 32), one decode step's worth: 30 layers x (qkv 960x576, o 576x576, gate|up 3072x576,
 * down 576x1536) + lm_head 49152x576, every weight its own buffer (96 MB: streamed from memory as in a
 * real step, not from cache).
 *
 *   cc -O3 -march=native -fopenmp -std=gnu11 -Icsrc benchmarks/cpu_qmatmul_bench.c csrc/cpu/[a-z]*.c \
 *      csrc/quant_ref.c csrc/fl_common.c -o /tmp/qbench -lm
 *   /tmp/qbench THREADS N STEPS [GROUP CODE ZEROS HEAD]
 *      N rows of x: 1 = decode; 512 = a prompt, lm_head then on 1 row. The body's layout: GROUP (32), CODE 0 int /
 *      1 nf4, ZEROS 1 min form / 0 symmetric (default: Q4_1's g32 int 1). HEAD: q8g32 (default, the GGUF's Q8_0),
 *      q8pc (int8 per channel: the at-load lm_head scheme), f16 (a tied float16 embedding), none.
 *
 * Prints the best of 5 per step, in wall time and in process CPU time (the second is what to compare on
 * a machine shared with other work: with 1 thread it does not count time spent descheduled). */
#include "cpu/cpu_internal.h"
#include "quant.h"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <string.h>
static double now(int cpu){struct timespec t;clock_gettime(cpu?CLOCK_PROCESS_CPUTIME_ID:CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static fl_weight mk(int R,int C,int bits,int zeros,int G,int code){
    fl_weight W={.dtype=FL_QUANT,.rows=R,.cols=C,.group_size=G,.bits=bits,.sdtype=FL_F16,.code=code};
    size_t db=(size_t)R*C*bits/8, sb=(size_t)R*(C/G)*2;
    W.data_d=fl_malloc(db); W.scales_d=fl_malloc(sb); if(zeros) W.zeros_d=fl_malloc(sb);
    for(size_t i=0;i<db;i++)((uint8_t*)W.data_d)[i]=rand();
    for(size_t i=0;i<sb/2;i++){((uint16_t*)W.scales_d)[i]=fl_f32_to_f16(0.01f); if(W.zeros_d)((uint16_t*)W.zeros_d)[i]=fl_f32_to_f16(-0.1f);}
    return W;
}
int main(int argc,char**argv){
  int nt=argc>1?atoi(argv[1]):2, n=argc>2?atoi(argv[2]):1, toks=argc>3?atoi(argv[3]):50;
  int G=argc>4?atoi(argv[4]):32, code=argc>5?atoi(argv[5]):0, zeros=argc>6?atoi(argv[6]):1;
  const char*head=argc>7?argv[7]:"q8g32";
  fl_backend*be; fl_backend_cpu_create(nt,&be);
  /* QBENCH_SHAPE=tinyllama: TinyLlama-1.1B (22 layers, 2048 wide, FFN 5632, 32000 vocabulary; 1.1 GB of f32 x
     rows would not matter: x stays in cache) */
  const int tiny=getenv("QBENCH_SHAPE")&&!strcmp(getenv("QBENCH_SHAPE"),"tinyllama");
  const int NL=tiny?22:30, HR=tiny?32000:49152, HC=tiny?2048:576;
  fl_weight L[30][4]; int Rs[4]={960,576,3072,576}, Cs[4]={576,576,576,1536};
  if(tiny){int r[4]={2560,2048,11264,2048},c[4]={2048,2048,2048,5632};memcpy(Rs,r,sizeof r);memcpy(Cs,c,sizeof c);}
  double bytes=0;
  for(int l=0;l<NL;l++)for(int k=0;k<4;k++){
    /* QBENCH_SAME=1: every layer reads layer 0's weights (cache-resident at the demo's shapes: the kernel's own speed) */
    if(l&&getenv("QBENCH_SAME")) L[l][k]=L[0][k]; else
    L[l][k]=mk(Rs[k],Cs[k],4,zeros,Cs[k]%G?32:G,code); /* down (1536 columns) with group 96: 32 */
    /* QBENCH_INTERLEAVE=1: the body in the interleaved layout a loaded model gets (fl_model_interleave) */
    if(getenv("QBENCH_INTERLEAVE")&&atoi(getenv("QBENCH_INTERLEAVE"))&&!(l&&getenv("QBENCH_SAME"))){int d;be->interleave_weight(be,&L[l][k],&d);}
    bytes+=(double)Rs[k]*Cs[k]/2+(double)Rs[k]*(Cs[k]/L[l][k].group_size)*2*(zeros?2:1);
  }
  fl_weight H=mk(HR,HC,8,0,strcmp(head,"q8pc")?32:HC,0);
  if(!strcmp(head,"f16")){
    H=(fl_weight){.dtype=FL_F16,.rows=HR,.cols=HC}; H.data_d=fl_malloc((size_t)HR*HC*2);
    for(size_t i=0;i<(size_t)HR*HC;i++)((uint16_t*)H.data_d)[i]=fl_f32_to_f16((rand()%1000)/50000.f-0.01f);
  }
  const int nohead=!strcmp(head,"none"), nobody=getenv("QBENCH_NOBODY")!=NULL; /* lm_head alone */
  const double hbytes=nohead?0:!strcmp(head,"f16")?(double)HR*HC*2:(double)HR*HC+(double)HR*(HC/H.group_size)*2;
  float*x=fl_malloc(4*(size_t)n*11264),*y=fl_malloc(4*(size_t)n*49152);
  for(int i=0;i<n*11264;i++)x[i]=(rand()%1000)/500.f-1;
  for(int cpu=0;cpu<2;cpu++){
    double best=1e9,bb=1e9,bh=1e9;
    for(int rep=0;rep<5;rep++){
      double t0=now(cpu), tb=0, th=0;
      for(int t=0;t<toks;t++){
        double a=now(cpu);
        if(!nobody) for(int l=0;l<NL;l++)for(int k=0;k<4;k++)be->matmul(be,y,x,n,&L[l][k],NULL);
        double b=now(cpu); if(!nohead) be->matmul(be,y,x,n>4?1:n,&H,NULL); double c=now(cpu);
        tb+=b-a; th+=c-b;
      }
      double dt=(now(cpu)-t0)/toks; if(dt<best){best=dt;bb=tb/toks;bh=th/toks;}
    }
    printf("%s threads=%d n=%d g%d code %d zeros %d head %s: %.3f ms/token (body %.3f = %.1f GB/s, lm_head %.3f = %.1f GB/s) -> %.1f tok/s (x n)\n",
           cpu?"cpu-time":"wall",nt,n,G,code,zeros,head,best*1e3,bb*1e3,bytes/bb/1e9,bh*1e3,nohead?0:hbytes/bh/1e9,n/best);
  }
}
