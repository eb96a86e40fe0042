/* block_pool.c: keep big heap blocks mapped after free() and hand them out
 * again, for CPU processes that LD_PRELOAD it (fpdm_jax/host_memory.py).
 *
 * Why: XLA:CPU allocates each execution's temporaries as a few big blocks
 * (621, 151 and 76 MiB for the small UNet's train step at batch 8) on its
 * worker threads and frees them when the execution ends. glibc maps blocks
 * that big afresh and unmaps them on free, always on a worker thread: a
 * thread arena cannot hold a block over 64 MiB, whatever the tunables say.
 * So every step the kernel zeroes and faults in hundreds of MiB again, and
 * on a VM that hands freed memory back to its host (virtio-balloon free
 * page reporting) the next step faults it in from the host, 2-10x slower
 * (benchmarks/README.md, findings 17 and 18). The same sizes come back every
 * step, so keeping the freed blocks mapped and reusing them removes all of it.
 *
 * What it does: malloc, calloc, realloc, memalign, aligned_alloc and
 * posix_memalign of at least FPDM_CPU_BLOCK_POOL_MIN_MIB (default 32) are
 * served from blocks this library maps itself (2 MiB multiples, advised for
 * transparent huge pages). free() keeps such a block for reuse as long as
 * the pool's unused blocks stay within FPDM_CPU_BLOCK_POOL_MIB (default
 * 4096; older unused blocks are unmapped first). A request reuses the
 * smallest unused block it fits in that wastes at most a quarter of it.
 * Everything else goes to glibc unchanged (__libc_malloc and friends).
 *
 * How free() tells the blocks apart: the 16 bytes before each of ours hold a
 * magic word and the pointer itself; a glibc pointer has its chunk header
 * there (readable, and never equal to its own address). A match is then
 * confirmed in the block table under the lock, so the check is exact, and
 * a free() of a glibc pointer never takes the lock.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_memalign(size_t, size_t);

#define SLOTS 128
#define GRAIN ((size_t)2 << 20) /* block lengths are multiples of a huge page */
#define MAGIC 0x31706f6f6c6d6466ULL
#define MIB ((size_t)1 << 20)

typedef struct {
  char *base;      /* NULL: slot empty */
  size_t len;
  char *user;      /* the pointer handed out */
  int in_use;
  uint64_t stamp;  /* when it was last freed: older unused blocks go first */
} block;

static block blocks[SLOTS];
static size_t unused_bytes; /* mapped bytes of blocks not in use */
static uint64_t clock_;
/* Defaults hold from the first malloc on; the constructor may change them. */
static size_t min_bytes = 32 * MIB;
static size_t max_unused = 4096 * MIB;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static size_t env_mib(const char *name, size_t fallback) {
  const char *text = getenv(name);
  if (!text || !*text) return fallback;
  char *end;
  unsigned long long v = strtoull(text, &end, 10);
  return *end ? fallback : (size_t)v * MIB;
}

/* A fork()ed child must not inherit the lock held by another thread. */
static void before_fork(void) { pthread_mutex_lock(&lock); }
static void after_fork(void) { pthread_mutex_unlock(&lock); }

__attribute__((constructor)) static void configure(void) {
  size_t min = env_mib("FPDM_CPU_BLOCK_POOL_MIN_MIB", min_bytes);
  min_bytes = min ? min : MIB;
  max_unused = env_mib("FPDM_CPU_BLOCK_POOL_MIB", max_unused);
  pthread_atfork(before_fork, after_fork, after_fork);
}

static char *user_pointer(char *base, size_t align) {
  uintptr_t u = ((uintptr_t)base + 16 + align - 1) & ~(uintptr_t)(align - 1);
  return (char *)u;
}

static void *stamp_header(char *user) {
  ((uint64_t *)user)[-2] = MAGIC;
  ((char **)user)[-1] = user;
  return user;
}

/* The slot of a block of ours in use at p, or -1. Call with the lock held. */
static int slot_of(const void *p) {
  for (int i = 0; i < SLOTS; i++)
    if (blocks[i].base && blocks[i].in_use && blocks[i].user == p) return i;
  return -1;
}

static int looks_ours(const void *p) {
  if (!p || ((uintptr_t)p & 63)) return 0;
  return ((const uint64_t *)p)[-2] == MAGIC && ((char *const *)p)[-1] == p;
}

/* Unmaps unused blocks, oldest first, until `extra` more unused bytes fit
 * under the cap. Call with the lock held. */
static void make_room(size_t extra) {
  while (unused_bytes + extra > max_unused) {
    int oldest = -1;
    for (int i = 0; i < SLOTS; i++)
      if (blocks[i].base && !blocks[i].in_use &&
          (oldest < 0 || blocks[i].stamp < blocks[oldest].stamp))
        oldest = i;
    if (oldest < 0) return;
    munmap(blocks[oldest].base, blocks[oldest].len);
    unused_bytes -= blocks[oldest].len;
    blocks[oldest].base = NULL;
  }
}

/* A block of ours for size bytes at alignment align (a power of two), or
 * NULL (the caller then asks glibc). *fresh says whether it is newly mapped,
 * i.e. already zero. */
static void *pool_alloc(size_t size, size_t align, int *fresh) {
  if (align < 64) align = 64;
  if (size > SIZE_MAX / 2 || align > SIZE_MAX / 4) return NULL;
  size_t len = (size + 16 + align + GRAIN - 1) & ~(GRAIN - 1);
  pthread_mutex_lock(&lock);
  int best = -1;
  for (int i = 0; i < SLOTS; i++) {
    block *b = &blocks[i];
    if (!b->base || b->in_use || b->len - b->len / 4 > len) continue;
    if (user_pointer(b->base, align) + size > b->base + b->len) continue;
    if (best < 0 || b->len < blocks[best].len) best = i;
  }
  if (best >= 0) {
    block *b = &blocks[best];
    b->in_use = 1;
    b->user = user_pointer(b->base, align);
    unused_bytes -= b->len;
    pthread_mutex_unlock(&lock);
    *fresh = 0;
    return stamp_header(b->user);
  }
  int slot = -1;
  for (int i = 0; i < SLOTS && slot < 0; i++)
    if (!blocks[i].base) slot = i;
  if (slot < 0) {
    pthread_mutex_unlock(&lock);
    return NULL;
  }
  char *base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) {
    pthread_mutex_unlock(&lock);
    return NULL;
  }
  madvise(base, len, MADV_HUGEPAGE); /* a hint; fine if THP is off */
  blocks[slot] = (block){base, len, user_pointer(base, align), 1, 0};
  char *user = blocks[slot].user;
  pthread_mutex_unlock(&lock);
  *fresh = 1;
  return stamp_header(user);
}

/* Takes back p if it is ours; returns 0 if it is glibc's. */
static int pool_free(void *p) {
  if (!looks_ours(p)) return 0;
  pthread_mutex_lock(&lock);
  int i = slot_of(p);
  if (i < 0) {
    pthread_mutex_unlock(&lock);
    return 0;
  }
  block *b = &blocks[i];
  if (b->len > max_unused) {
    munmap(b->base, b->len);
    b->base = NULL;
  } else {
    make_room(b->len); /* while b is still in use, so it is not the one unmapped */
    b->in_use = 0;
    b->stamp = ++clock_;
    unused_bytes += b->len;
  }
  pthread_mutex_unlock(&lock);
  return 1;
}

/* Bytes usable at p if it is ours, else 0. */
static size_t pool_usable(const void *p) {
  if (!looks_ours(p)) return 0;
  pthread_mutex_lock(&lock);
  int i = slot_of(p);
  size_t n = i < 0 ? 0 : (size_t)(blocks[i].base + blocks[i].len - blocks[i].user);
  pthread_mutex_unlock(&lock);
  return n;
}

void *malloc(size_t size) {
  int fresh;
  void *p = size >= min_bytes ? pool_alloc(size, 64, &fresh) : NULL;
  return p ? p : __libc_malloc(size);
}

void free(void *p) {
  if (p && !pool_free(p)) __libc_free(p);
}

void free_sized(void *p, size_t size) { (void)size; free(p); }
void free_aligned_sized(void *p, size_t align, size_t size) { (void)align; (void)size; free(p); }

void *calloc(size_t count, size_t size) {
  if (size && count > SIZE_MAX / size) {
    errno = ENOMEM;
    return NULL;
  }
  size_t total = count * size;
  int fresh;
  void *p = total >= min_bytes ? pool_alloc(total, 64, &fresh) : NULL;
  if (!p) return __libc_calloc(count, size);
  if (!fresh) memset(p, 0, total);
  return p;
}

void *realloc(void *p, size_t size) {
  size_t have = pool_usable(p);
  if (!have) return __libc_realloc(p, size); /* glibc's block stays glibc's */
  if (size <= have) return p;
  void *q = malloc(size);
  if (!q) return NULL;
  memcpy(q, p, have);
  free(p);
  return q;
}

void *memalign(size_t align, size_t size) {
  int fresh;
  void *p = size >= min_bytes && align && !(align & (align - 1)) ? pool_alloc(size, align, &fresh)
                                                                 : NULL;
  return p ? p : __libc_memalign(align, size);
}

void *aligned_alloc(size_t align, size_t size) { return memalign(align, size); }

int posix_memalign(void **out, size_t align, size_t size) {
  if (!align || (align & (align - 1)) || align % sizeof(void *)) return EINVAL;
  void *p = memalign(align, size);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}

size_t malloc_usable_size(void *p) {
  size_t n = pool_usable(p);
  if (n || !p) return n;
  static size_t (*glibc_usable)(void *);
  if (!glibc_usable) glibc_usable = (size_t(*)(void *))dlsym(RTLD_NEXT, "malloc_usable_size");
  return glibc_usable ? glibc_usable(p) : 0;
}
