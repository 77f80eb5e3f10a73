#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#define N (1UL<<30)
static char *buf; static double sums[2];
static void *run(void *p){ long id=(long)p; __m256i acc=_mm256_setzero_si256();
 for(int rep=0;rep<3;rep++) for(size_t i=id*(N/2);i<(id+1)*(N/2);i+=32) acc=_mm256_add_epi64(acc,_mm256_load_si256((__m256i*)(buf+i)));
 long long t[4]; _mm256_storeu_si256((__m256i*)t,acc); sums[id]=t[0]; return 0;}
int main(){ buf=aligned_alloc(64,N); memset(buf,1,N); struct timespec a,b; pthread_t th[2];
 clock_gettime(CLOCK_MONOTONIC,&a); for(long i=0;i<2;i++) pthread_create(&th[i],0,run,(void*)i); for(int i=0;i<2;i++) pthread_join(th[i],0);
 clock_gettime(CLOCK_MONOTONIC,&b); double s=(b.tv_sec-a.tv_sec)+(b.tv_nsec-a.tv_nsec)/1e9; printf("read bandwidth, 2 threads: %.1f GB/s (%g)\n", 3.0*N/s/1e9, sums[0]+sums[1]); }
