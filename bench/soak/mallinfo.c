/* soak_mallinfo: glibc's malloc statistics for the soak master (bench/soak/run builds
 * it next to the samples when gcc and the Lua headers are there; the master reports
 * it when it loads). in_use: bytes handed out by malloc and not freed (arena and
 * mmap'd), the C side's live memory: libuv handles, channel buffers, the Lua heap's
 * blocks and the block cache's. free: bytes malloc holds free in its arenas
 * (fragmentation). */
#include <malloc.h>
#include <lua.h>
#include <lauxlib.h>

static int l_stats(lua_State *L) {
  struct mallinfo2 mi = mallinfo2();
  lua_createtable(L, 0, 3);
  lua_pushinteger(L, (lua_Integer)(mi.uordblks + mi.hblkhd));
  lua_setfield(L, -2, "in_use");
  lua_pushinteger(L, (lua_Integer)mi.fordblks);
  lua_setfield(L, -2, "free");
  lua_pushinteger(L, (lua_Integer)mi.arena);
  lua_setfield(L, -2, "arena");
  return 1;
}

int luaopen_soak_mallinfo(lua_State *L) {
  lua_newtable(L);
  lua_pushcfunction(L, l_stats);
  lua_setfield(L, -2, "stats");
  return 1;
}
