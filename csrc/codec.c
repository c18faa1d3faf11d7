/* placeholder: being written */
#include "codec.h"
int cl_codec_encode(lua_State *L, int idx, cl_buf *b, const char *root) { (void)idx; (void)b; (void)root; lua_pushliteral(L, "codec not built"); return -1; }
int cl_codec_decode(lua_State *L, const char *p, size_t len) { (void)p; (void)len; lua_pushliteral(L, "codec not built"); return -1; }
void cl_open_codec(lua_State *L) { (void)L; }
