/* The message codec: Lua values <-> bytes. */
#ifndef CLUSTER_CODEC_H
#define CLUSTER_CODEC_H
#include "util.h"

/* Deepest nesting of tables accepted by both sides. */
#define CL_CODEC_MAX_DEPTH 200
/* Most tables in one value, on both sides: what a peer can make its receiver build
 * stays bounded (some 100 MB) whatever it sends. */
#define CL_CODEC_MAX_TABLES (1 << 20)

/* Appends the encoding of the value at idx to b. Returns 0, or -1 leaving b->len
 * unspecified (the caller rolls back) and pushing an error string naming the path
 * relative to `root` ("message.handler is a function", "message[3] is a cycle").
 * Never raises for unsupported values. */
int cl_codec_encode(lua_State *L, int idx, cl_buf *b, const char *root);

/* Decodes exactly len bytes: pushes the value and returns 0, or pushes an error
 * string and returns -1 (malformed, truncated, trailing bytes, too deep). Never
 * raises on any input; never reads outside [p, p+len). */
int cl_codec_decode(lua_State *L, const char *p, size_t len);
#endif
