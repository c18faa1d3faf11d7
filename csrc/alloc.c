/* The Lua state's allocator: a cache of freed blocks by exact size, over the allocator
 * the state had (lauxlib's realloc/free for lua5.4).
 *
 * A connection allocates the same objects every time (its socket's table and hash
 * part, closures, the userdata of its handle, strings), and the collector frees them
 * in batches, far more of one size than glibc's per-thread cache keeps (seven); the
 * rest go through malloc's slow paths (perf put malloc and free at about a fifth of a
 * worker's user time serving short connections). Here a freed block of up to
 * MAX_CACHED bytes goes on the stack of its size, and the next allocation of that size
 * takes it.
 *
 * Every block stays the previous allocator's block of exactly the size it was asked
 * for, so blocks may cross the layer in either direction: those allocated before it
 * was installed are cached when freed, cached ones are reallocated or freed by the
 * previous allocator with their own size. (A C module that frees through
 * lua_getallocf must pass a block's true size, as the Lua manual requires.)
 *
 * At most CACHE_BYTES are held, counted as malloc lays the blocks out, with their
 * slots in the stacks. A cache that is full gives everything back and starts again, so
 * sizes that stopped coming back do not hold it for good. It gives everything back
 * too when the previous allocator runs out of memory (and the allocation is tried
 * again), and when the state closes: its registry's finalizers run before its last
 * frees, and the anchor's puts the previous allocator back, so nothing is left behind.
 * If another allocator was installed over this one meanwhile, it may still call this
 * one: then the cache stays, and is lost with the process.
 *
 * Under AddressSanitizer a cached block is poisoned until it is handed out again, so
 * the C core reading a collected object is still caught. LUACLUSTER_NO_BLOCK_CACHE
 * (any value) leaves the state's allocator alone. */
#include "util.h"

#include <stdlib.h>
#include <string.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define HIDE(block, size) ASAN_POISON_MEMORY_REGION(block, size)
#define SHOW(block, size) ASAN_UNPOISON_MEMORY_REGION(block, size)
#else
#define HIDE(block, size) ((void)(block), (void)(size))
#define SHOW(block, size) ((void)(block), (void)(size))
#endif

#define MAX_CACHED 1024              /* largest block size kept for reuse */
#define CACHE_BYTES (4u << 20)       /* most memory held in all stacks together */
#define FIRST_SLOTS 64               /* a stack's first capacity */

/* The free blocks of one size, newest last. The blocks' addresses are kept here
 * rather than linked through the blocks: taking one reads only this array, and the
 * block itself is first touched by the write that initialises it, which need not
 * wait for memory the way a read of a link would. */
typedef struct block_stack {
  void **blocks;
  unsigned count, capacity;
} block_stack;

typedef struct block_cache {
  lua_Alloc prev;                     /* the allocator under this one, and its ud */
  void *prev_ud;
  size_t held;                        /* memory the kept blocks take (block_cost) */
  block_stack stacks[MAX_CACHED + 1]; /* by exact size */
} block_cache;

static const char CACHE_KEY[] = "cluster.block_cache";

/* The memory a kept block of `size` bytes takes: its malloc chunk (a header word, in
 * 16-byte steps, 32 at least) and its slot in the stack. */
static size_t block_cost(size_t size) {
  size_t chunk = (size + sizeof(size_t) + 15) & ~(size_t)15;
  return (chunk < 32 ? 32 : chunk) + sizeof(void *);
}

/* Gives every kept block, and the stacks' arrays, back to the previous allocator. */
static void cache_release(block_cache *c) {
  for (size_t size = 1; size <= MAX_CACHED; size++) {
    block_stack *s = &c->stacks[size];
    while (s->count > 0) {
      void *block = s->blocks[--s->count];
      SHOW(block, size);
      c->prev(c->prev_ud, block, size, 0);
    }
    if (s->blocks != NULL) c->prev(c->prev_ud, s->blocks, s->capacity * sizeof *s->blocks, 0);
    s->blocks = NULL;
    s->capacity = 0;
  }
  c->held = 0;
}

/* The previous allocator's (re)allocation; when it fails, again after the cache has
 * given its blocks back. */
static void *prev_alloc(block_cache *c, void *ptr, size_t osize, size_t nsize) {
  void *block = c->prev(c->prev_ud, ptr, osize, nsize);
  if (block == NULL && c->held > 0) {
    cache_release(c);
    block = c->prev(c->prev_ud, ptr, osize, nsize);
  }
  return block;
}

/* Keeps a freed block of `size` bytes; 0 when it cannot (then the caller frees it). */
static int cache_keep(block_cache *c, void *block, size_t size) {
  if (size == 0 || size > MAX_CACHED) return 0;
  size_t cost = block_cost(size);
  if (c->held + cost > CACHE_BYTES) cache_release(c);
  block_stack *s = &c->stacks[size];
  if (s->count == s->capacity) {
    unsigned capacity = s->capacity ? s->capacity * 2 : FIRST_SLOTS;
    void **blocks = c->prev(c->prev_ud, s->blocks, s->capacity * sizeof *blocks,
                            capacity * sizeof *blocks);
    if (blocks == NULL) return 0;
    s->blocks = blocks;
    s->capacity = capacity;
  }
  s->blocks[s->count++] = block;
  c->held += cost;
  HIDE(block, size);
  return 1;
}

static void *cache_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  block_cache *c = ud;
  if (nsize == 0) {
    if (ptr != NULL && !cache_keep(c, ptr, osize)) c->prev(c->prev_ud, ptr, osize, 0);
    return NULL;
  }
  if (ptr == NULL) { /* (osize is the new object's type then) */
    if (nsize <= MAX_CACHED) {
      block_stack *s = &c->stacks[nsize];
      if (s->count > 0) {
        void *block = s->blocks[--s->count];
        c->held -= block_cost(nsize);
        SHOW(block, nsize);
        return block;
      }
    }
    return prev_alloc(c, NULL, osize, nsize);
  }
  if (nsize == osize) return ptr;
  return prev_alloc(c, ptr, osize, nsize);
}

/* __gc of the registry's anchor, run as the state closes: from here on the state
 * allocates and frees through the previous allocator. */
static int cache_close(lua_State *L) {
  block_cache **slot = lua_touserdata(L, 1);
  block_cache *c = *slot;
  void *ud;
  if (c == NULL || lua_getallocf(L, &ud) != cache_alloc || ud != c) return 0;
  *slot = NULL;
  lua_setallocf(L, c->prev, c->prev_ud);
  cache_release(c);
  c->prev(c->prev_ud, c, sizeof *c, 0);
  return 0;
}

/* core.block_cache_bytes(): the memory the cache holds for reuse, or nil when the
 * state allocates without it (LUACLUSTER_NO_BLOCK_CACHE, or another allocator over
 * it). */
static int l_block_cache_bytes(lua_State *L) {
  void *ud;
  if (lua_getallocf(L, &ud) == cache_alloc) lua_pushinteger(L, (lua_Integer)((block_cache *)ud)->held);
  else lua_pushnil(L);
  return 1;
}

/* Puts the cache under the state, once per state, unless LUACLUSTER_NO_BLOCK_CACHE is
 * set; adds core.block_cache_bytes to the table on the top. */
void cl_open_alloc(lua_State *L) {
  lua_pushcfunction(L, l_block_cache_bytes);
  lua_setfield(L, -2, "block_cache_bytes");
  if (getenv("LUACLUSTER_NO_BLOCK_CACHE") != NULL) return;
  if (lua_getfield(L, LUA_REGISTRYINDEX, CACHE_KEY) != LUA_TNIL) { /* installed already */
    lua_pop(L, 1);
    return;
  }
  lua_pop(L, 1);
  void *prev_ud;
  lua_Alloc prev = lua_getallocf(L, &prev_ud);
  block_cache **slot = lua_newuserdatauv(L, sizeof *slot, 0);
  *slot = NULL;
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, cache_close);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  lua_setfield(L, LUA_REGISTRYINDEX, CACHE_KEY);
  block_cache *c = prev(prev_ud, NULL, 0, sizeof *c);
  if (c == NULL) return; /* no memory for it: the state keeps its allocator */
  memset(c, 0, sizeof *c);
  c->prev = prev;
  c->prev_ud = prev_ud;
  *slot = c;
  lua_setallocf(L, cache_alloc, c);
}
