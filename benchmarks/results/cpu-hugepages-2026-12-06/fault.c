#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int c,char**v){size_t n=(size_t)760<<20;int adv=atoi(v[1]);void*p;posix_memalign(&p,2<<20,n);
if(adv)madvise(p,n,MADV_HUGEPAGE);double t=now();memset(p,1,n);double t1=now();memset(p,2,n);double t2=now();
printf("adv=%d first touch %.0f ms (%.1f GB/s), second write %.0f ms\n",adv,(t1-t)*1e3,n/(t1-t)/1e9,(t2-t1)*1e3);}
