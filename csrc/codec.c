/* The message codec: Lua values <-> bytes, on the hot path of every message.
 *
 * Wire format. Every value starts with a one-byte tag; multi-byte integers, lengths
 * and floats that follow a tag are little-endian.
 *
 *   0x00..0x7f  integer 0..127 (the tag is the value)
 *   0x80..0x9f  string of 0..31 bytes (length = tag & 0x1f), the bytes follow
 *   0xa0..0xaf  table of 0..15 key/value pairs and no array part (count = tag & 0x0f)
 *   0xb0..0xbf  table of 0..15 array values t[1..n] and no pairs (count = tag & 0x0f)
 *   0xc0        nil
 *   0xc1, 0xc2  false, true
 *   0xc3..0xc6  integer, two's complement in 1, 2, 4, 8 bytes
 *   0xc7        float, IEEE 754 binary32 (only when it holds the value exactly, never NaN)
 *   0xc8        float, IEEE 754 binary64 (NaN keeps its bits)
 *   0xc9..0xcc  string, length in 1, 2, 4, 8 bytes, then the bytes
 *   0xcd        table: varint narr, varint npairs, narr values (t[1..narr]), then
 *               npairs keys and values (key, value, key, value, ...)
 *   0xce..0xdf  reserved, rejected
 *   0xe0..0xff  integer -32..-1 (the tag as an int8)
 *
 * varint is unsigned LEB128 (7 bits per byte, low group first, high bit = more), at
 * most 10 bytes. The encoder may pad a varint with 0x80 continuation bytes so that it
 * can backpatch a large table's header in place; the decoder accepts padded varints.
 *
 * Integers and floats never share a tag, so math.type survives the trip (1 vs 1.0).
 * The array part is the run of non-nil t[1], t[2], ... up to the first nil (bounded
 * by the # border); every other key goes to the pairs, in lua_next order. Decoding
 * accepts any order and duplicate keys (the last wins) but rejects nil and NaN keys.
 * Nesting: the outermost table is level 1; both sides refuse level CL_CODEC_MAX_DEPTH+1.
 */
#include "codec.h"

#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

enum {
  T_NIL = 0xc0, T_FALSE = 0xc1, T_TRUE = 0xc2,
  T_INT8 = 0xc3, T_INT16 = 0xc4, T_INT32 = 0xc5, T_INT64 = 0xc6,
  T_FLOAT32 = 0xc7, T_FLOAT64 = 0xc8,
  T_STR8 = 0xc9, T_STR16 = 0xca, T_STR32 = 0xcb, T_STR64 = 0xcc,
  T_TABLE = 0xcd,
  T_FIXSTR = 0x80, T_FIXMAP = 0xa0, T_FIXARRAY = 0xb0
};

#define VARINT_MAX 10
/* A table header reserves room for this many bytes of the pair count: 3 varint bytes
 * hold counts below 2^21, so only giant tables ever need the body moved right. */
#define HDR_PAIRS_WIDTH 3
/* Bodies up to this size are moved left to give the table its minimal header;
 * bigger ones keep a padded header rather than pay for the move (at every level). */
#define COMPACT_LIMIT 4096
/* Longest rendition of one path in an error message. */
#define PATH_MAX_LEN 400

static void put_le(unsigned char *p, uint64_t v, int n) {
  for (int i = 0; i < n; i++, v >>= 8) p[i] = (unsigned char)v;
}

static uint64_t get_le(const unsigned char *p, int n) {
  uint64_t v = 0;
  for (int i = n - 1; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}

static size_t varint_len(uint64_t v) {
  size_t n = 1;
  while (v >= 0x80) {
    v >>= 7;
    n++;
  }
  return n;
}

/* Writes v in exactly `width` bytes (width >= varint_len(v)), padding with 0x80 groups. */
static unsigned char *put_varint(unsigned char *p, uint64_t v, size_t width) {
  for (size_t i = 0; i + 1 < width; i++, v >>= 7) *p++ = (unsigned char)(0x80 | (v & 0x7f));
  *p++ = (unsigned char)v;
  return p;
}

/* ==================================================================== encoder */

enum { PC_INDEX, PC_KEY, PC_TABLEKEY };

typedef struct {
  int kind;      /* PC_INDEX: array slot i; PC_KEY: key at stack index kidx; PC_TABLEKEY */
  int kidx;
  lua_Integer i;
} path_comp;

typedef struct {
  lua_State *L;
  cl_buf *b;
  const char *root;
  int depth;                                  /* tables currently open */
  size_t tables;                              /* tables encoded */
  const void *open[CL_CODEC_MAX_DEPTH];       /* those tables, for cycle detection */
  path_comp path[CL_CODEC_MAX_DEPTH];         /* the key being encoded at each level */
} encoder;

/* ---- error messages naming the path ---- */

typedef struct {
  char s[PATH_MAX_LEN + 4];
  size_t n;
  int full;
} pathbuf;

static void pb_add(pathbuf *pb, const char *s, size_t n) {
  if (pb->full) return;
  if (n > PATH_MAX_LEN - pb->n) {
    n = PATH_MAX_LEN - pb->n;
    pb->full = 1;
  }
  memcpy(pb->s + pb->n, s, n);
  pb->n += n;
  if (pb->full) {
    memcpy(pb->s + pb->n, "...", 3);
    pb->n += 3;
  }
}

static int is_identifier(const char *s, size_t n) {
  if (n == 0 || n > 64) return 0;
  if (!(s[0] == '_' || (s[0] >= 'a' && s[0] <= 'z') || (s[0] >= 'A' && s[0] <= 'Z'))) return 0;
  for (size_t i = 1; i < n; i++) {
    char c = s[i];
    if (!(c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')))
      return 0;
  }
  return 1;
}

/* Appends `["..."]` with the key escaped as in a Lua string literal (\", \\, and \ddd
 * with three digits) and cut to 40 bytes, so the message stays one printable line
 * whatever bytes the key holds, and reads back as the key. */
static void pb_add_quoted(pathbuf *pb, const char *s, size_t n) {
  char tmp[40 * 4 + 16];
  size_t k = 0;
  tmp[k++] = '[';
  tmp[k++] = '"';
  for (size_t i = 0; i < n && i < 40; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '"' || c == '\\') {
      tmp[k++] = '\\';
      tmp[k++] = (char)c;
    } else if (c < 0x20 || c >= 0x7f) {
      k += (size_t)snprintf(tmp + k, sizeof tmp - k, "\\%03u", c);
    } else {
      tmp[k++] = (char)c;
    }
  }
  if (n > 40) {
    memcpy(tmp + k, "...", 3);
    k += 3;
  }
  tmp[k++] = '"';
  tmp[k++] = ']';
  pb_add(pb, tmp, k);
}

static void pb_add_comp(pathbuf *pb, lua_State *L, const path_comp *c) {
  char tmp[64];
  int n;
  if (c->kind == PC_INDEX) {
    n = snprintf(tmp, sizeof tmp, "[" LUA_INTEGER_FMT "]", (LUAI_UACINT)c->i);
    pb_add(pb, tmp, (size_t)n);
    return;
  }
  if (c->kind == PC_TABLEKEY) {
    pb_add(pb, "[<table key>]", 13);
    return;
  }
  /* Keys are read without conversion: lua_tolstring on a number key would break the
   * lua_next traversal that owns it. */
  switch (lua_type(L, c->kidx)) {
  case LUA_TSTRING: {
    size_t len;
    const char *s = lua_tolstring(L, c->kidx, &len);
    if (is_identifier(s, len)) {
      pb_add(pb, ".", 1);
      pb_add(pb, s, len);
    } else {
      pb_add_quoted(pb, s, len);
    }
    return;
  }
  case LUA_TNUMBER:
    if (lua_isinteger(L, c->kidx))
      n = snprintf(tmp, sizeof tmp, "[" LUA_INTEGER_FMT "]", (LUAI_UACINT)lua_tointeger(L, c->kidx));
    else
      n = snprintf(tmp, sizeof tmp, "[%.14g]", (double)lua_tonumber(L, c->kidx));
    break;
  case LUA_TBOOLEAN:
    n = snprintf(tmp, sizeof tmp, "[%s]", lua_toboolean(L, c->kidx) ? "true" : "false");
    break;
  case LUA_TTABLE:
    n = snprintf(tmp, sizeof tmp, "[<table>]");
    break;
  default:
    n = snprintf(tmp, sizeof tmp, "[<%s>]", luaL_typename(L, c->kidx));
    break;
  }
  pb_add(pb, tmp, (size_t)n);
}

/* Pushes "<root><path of the first ncomps levels><what>" and returns -1. The stack
 * always has a free slot here: every level checks for more than it uses. */
static int enc_fail(encoder *e, int ncomps, const char *what) {
  pathbuf pb;
  pb.n = 0;
  pb.full = 0;
  pb_add(&pb, e->root, strlen(e->root));
  for (int i = 0; i < ncomps; i++) pb_add_comp(&pb, e->L, &e->path[i]);
  lua_pushlstring(e->L, pb.s, pb.n);
  lua_pushstring(e->L, what);
  lua_concat(e->L, 2);
  return -1;
}

static int enc_oom(encoder *e) {
  lua_pushliteral(e->L, "out of memory");
  return -1;
}

/* ---- writing ---- */

/* Inline fast check; cl_buf_reserve only when the buffer must grow. */
#define NEED(e, n)                                                                    \
  do {                                                                                \
    if ((e)->b->cap - (e)->b->len < (n) && cl_buf_reserve((e)->b, (n)) != 0)          \
      return enc_oom(e);                                                              \
  } while (0)

static int enc_byte(encoder *e, unsigned char c) {
  NEED(e, 1);
  e->b->data[e->b->len++] = (char)c;
  return 0;
}

static int enc_int(encoder *e, lua_Integer v) {
  unsigned char *p;
  int w;
  unsigned char tag;
  if (v >= -32 && v <= 127) return enc_byte(e, (unsigned char)(v & 0xff));
  if (v >= INT8_MIN && v <= INT8_MAX) {
    tag = T_INT8, w = 1;
  } else if (v >= INT16_MIN && v <= INT16_MAX) {
    tag = T_INT16, w = 2;
  } else if (v >= INT32_MIN && v <= INT32_MAX) {
    tag = T_INT32, w = 4;
  } else {
    tag = T_INT64, w = 8;
  }
  NEED(e, 9);
  p = (unsigned char *)e->b->data + e->b->len;
  p[0] = tag;
  put_le(p + 1, (uint64_t)v, w);
  e->b->len += 1 + (size_t)w;
  return 0;
}

static int enc_float(encoder *e, lua_Number d) {
  unsigned char *p;
  NEED(e, 9);
  p = (unsigned char *)e->b->data + e->b->len;
  /* The range test keeps the double->float conversion defined; NaN fails both tests
   * and goes out as binary64 with its bits intact. */
  if (((d >= -FLT_MAX && d <= FLT_MAX) || isinf(d)) &&
      (lua_Number)(float)d == d) {
    float f = (float)d;
    uint32_t u;
    memcpy(&u, &f, 4);
    p[0] = T_FLOAT32;
    put_le(p + 1, u, 4);
    e->b->len += 5;
  } else {
    double x = (double)d;
    uint64_t u;
    memcpy(&u, &x, 8);
    p[0] = T_FLOAT64;
    put_le(p + 1, u, 8);
    e->b->len += 9;
  }
  return 0;
}

static int enc_str(encoder *e, const char *s, size_t n) {
  unsigned char *p;
  size_t h;
  if (n > SIZE_MAX - 9) return enc_oom(e);
  NEED(e, n + 9);
  p = (unsigned char *)e->b->data + e->b->len;
  if (n < 32) {
    p[0] = (unsigned char)(T_FIXSTR | n);
    h = 1;
  } else if (n <= UINT8_MAX) {
    p[0] = T_STR8, p[1] = (unsigned char)n, h = 2;
  } else if (n <= UINT16_MAX) {
    p[0] = T_STR16, put_le(p + 1, n, 2), h = 3;
  } else if (n <= UINT32_MAX) {
    p[0] = T_STR32, put_le(p + 1, n, 4), h = 5;
  } else {
    p[0] = T_STR64, put_le(p + 1, n, 8), h = 9;
  }
  memcpy(p + h, s, n);
  e->b->len += h + n;
  return 0;
}

static int enc_value(encoder *e, int idx);


static int enc_table(encoder *e, int idx) {
  lua_State *L = e->L;
  cl_buf *b = e->b;
  const void *self = lua_topointer(L, idx);
  int lvl = e->depth;
  /* Checked as the walk goes: a table reached by many paths (t = {t, t}, forty times
   * over) is encoded once per path, and the walk would not end in a lifetime. */
  if (++e->tables > CL_CODEC_MAX_TABLES) {
    lua_pushfstring(L, "%s holds more than %d tables (counting a table once per path to it), more than a receiver takes",
                    e->root, CL_CODEC_MAX_TABLES);
    return -1;
  }
  lua_Unsigned border, narr = 0, npairs = 0;
  size_t hdr, hpos, body, gmin, want;
  unsigned char *p;

  /* The open tables are the current path, so a repeat is a cycle while the same table
   * in sibling positions (a DAG) is fine. The path is at most 200 long and usually a
   * handful, so a linear scan beats any set. */
  for (int i = 0; i < lvl; i++)
    if (e->open[i] == self) return enc_fail(e, lvl, " is a cycle");
  if (lvl >= CL_CODEC_MAX_DEPTH) {
    char what[48];
    snprintf(what, sizeof what, ": nesting deeper than %d", CL_CODEC_MAX_DEPTH);
    return enc_fail(e, lvl, what);
  }
  /* Each level pushes at most 2 slots; asking for 4 keeps one spare for the error. */
  if (!lua_checkstack(L, 4)) return enc_fail(e, lvl, ": Lua stack overflow");
  e->open[lvl] = self;
  e->depth = lvl + 1;

  border = lua_rawlen(L, idx);
  hdr = 1 + varint_len(border) + HDR_PAIRS_WIDTH;
  NEED(e, hdr);
  hpos = b->len;
  b->len += hdr;

  e->path[lvl].kind = PC_INDEX;
  while (narr < border) {
    if (lua_rawgeti(L, idx, (lua_Integer)(narr + 1)) == LUA_TNIL) {
      lua_pop(L, 1);
      break;
    }
    e->path[lvl].i = (lua_Integer)(narr + 1);
    if (enc_value(e, lua_gettop(L)) != 0) return -1;
    lua_pop(L, 1);
    narr++;
  }

  lua_pushnil(L);
  while (lua_next(L, idx)) {
    int kt = lua_type(L, -2);
    if (kt == LUA_TNUMBER && lua_isinteger(L, -2)) {
      lua_Integer k = lua_tointeger(L, -2);
      if (k >= 1 && (lua_Unsigned)k <= narr) {
        lua_pop(L, 1);
        continue;
      }
    } else if (kt != LUA_TSTRING && kt != LUA_TNUMBER && kt != LUA_TBOOLEAN && kt != LUA_TTABLE) {
      char what[64];
      snprintf(what, sizeof what, " has a key of type %s", lua_typename(L, kt));
      return enc_fail(e, lvl, what);
    }
    if (kt == LUA_TTABLE) {
      e->path[lvl].kind = PC_TABLEKEY;
      if (enc_table(e, lua_gettop(L) - 1) != 0) return -1;
    } else if (enc_value(e, lua_gettop(L) - 1) != 0) {
      return -1;
    }
    e->path[lvl].kind = PC_KEY;
    e->path[lvl].kidx = lua_gettop(L) - 1;
    if (enc_value(e, lua_gettop(L)) != 0) return -1;
    lua_pop(L, 1);
    npairs++;
  }
  e->depth = lvl;

  /* Backpatch the header. Small bodies are shifted so the table gets its minimal
   * header (one byte for the common small message); big bodies keep the reserved
   * room and pad the varints instead, so nesting never costs repeated big moves. */
  body = b->len - hpos - hdr;
  gmin = 1 + varint_len(narr) + varint_len(npairs);
  if ((narr == 0 && npairs <= 15) || (npairs == 0 && narr <= 15))
    want = 1;
  else
    want = gmin;
  if (want != hdr && (want > hdr || body <= COMPACT_LIMIT || hdr - 1 - varint_len(npairs) > VARINT_MAX)) {
    if (want > hdr) NEED(e, want - hdr);
    memmove(b->data + hpos + want, b->data + hpos + hdr, body);
    b->len = hpos + want + body;
    hdr = want;
  }
  p = (unsigned char *)b->data + hpos;
  if (hdr == 1) {
    p[0] = (unsigned char)(narr == 0 ? T_FIXMAP | npairs : T_FIXARRAY | narr);
  } else {
    size_t wpairs = varint_len(npairs);
    p[0] = T_TABLE;
    p = put_varint(p + 1, narr, hdr - 1 - wpairs);
    put_varint(p, npairs, wpairs);
  }
  return 0;
}

static int enc_value(encoder *e, int idx) {
  lua_State *L = e->L;
  int t = lua_type(L, idx);
  switch (t) {
  case LUA_TNIL:
    return enc_byte(e, T_NIL);
  case LUA_TBOOLEAN:
    return enc_byte(e, lua_toboolean(L, idx) ? T_TRUE : T_FALSE);
  case LUA_TNUMBER:
    if (lua_isinteger(L, idx)) return enc_int(e, lua_tointeger(L, idx));
    return enc_float(e, lua_tonumber(L, idx));
  case LUA_TSTRING: {
    size_t n;
    const char *s = lua_tolstring(L, idx, &n);
    return enc_str(e, s, n);
  }
  case LUA_TTABLE:
    return enc_table(e, idx);
  default: {
    char what[48];
    snprintf(what, sizeof what, " is a %s", lua_typename(L, t));
    return enc_fail(e, e->depth, what);
  }
  }
}

int cl_codec_encode(lua_State *L, int idx, cl_buf *b, const char *root) {
  encoder e;
  int base = lua_gettop(L);
  idx = lua_absindex(L, idx);
  e.L = L;
  e.b = b;
  e.root = root ? root : "value";
  e.depth = 0;
  e.tables = 0;
  if (!lua_checkstack(L, 4)) {
    lua_pushliteral(L, "Lua stack overflow");
    return -1;
  }
  if (enc_value(&e, idx) != 0) {
    /* Drop whatever the failed traversal left, keep just the message. */
    if (lua_gettop(L) > base + 1) {
      lua_replace(L, base + 1);
      lua_settop(L, base + 1);
    }
    return -1;
  }
  lua_settop(L, base);
  return 0;
}

/* ==================================================================== decoder */

typedef struct {
  lua_State *L;
  const unsigned char *start, *p, *end;
  /* Bytes that the not yet decoded elements of all open tables need at the very
   * least (1 per array value, 2 per pair). A table's claimed counts must fit in what
   * is left after that, so the preallocations of all nested tables together stay
   * below the input size whatever counts a malformed input claims. */
  size_t owed;
  /* Tables the rest of the input may still make. A table costs Lua some 60 bytes and
   * the input as little as 1: without a limit, a 64 MiB frame of empty tables would
   * cost its receiver 5 GB. */
  size_t tables_left;
  int depth;
  const char *err;
  size_t erroff;
} decoder;

static int dec_fail(decoder *d, const char *msg, const unsigned char *at) {
  d->err = msg;
  d->erroff = (size_t)(at - d->start);
  return -1;
}

#define LEFT(d) ((size_t)((d)->end - (d)->p))

static int dec_varint(decoder *d, uint64_t *out) {
  const unsigned char *at = d->p;
  uint64_t v = 0;
  for (int i = 0; i < VARINT_MAX; i++) {
    unsigned char c;
    if (d->p >= d->end) return dec_fail(d, "truncated count", at);
    c = *d->p++;
    if (i == VARINT_MAX - 1 && c > 1) return dec_fail(d, "count overflows 64 bits", at);
    v |= (uint64_t)(c & 0x7f) << (7 * i);
    if (!(c & 0x80)) {
      *out = v;
      return 0;
    }
  }
  return dec_fail(d, "count longer than 10 bytes", at);
}

static int dec_str(decoder *d, uint64_t n, const unsigned char *at) {
  if (n > LEFT(d)) return dec_fail(d, "string runs past the end", at);
  lua_pushlstring(d->L, (const char *)d->p, (size_t)n);
  d->p += n;
  return 0;
}

static int dec_value(decoder *d);

static int dec_table(decoder *d, uint64_t narr, uint64_t npairs, const unsigned char *at) {
  lua_State *L = d->L;
  size_t left = LEFT(d), claim;
  if (d->depth >= CL_CODEC_MAX_DEPTH) return dec_fail(d, "nesting deeper than 200", at);
  if (d->tables_left == 0) return dec_fail(d, "more tables than a message may hold", at);
  d->tables_left--;
  if (narr > left || npairs > (left - narr) / 2) return dec_fail(d, "table counts exceed the input", at);
  claim = (size_t)narr + 2 * (size_t)npairs;
  if (d->owed > left - claim) return dec_fail(d, "table counts exceed the input", at);
  if (!lua_checkstack(L, 4)) return dec_fail(d, "Lua stack overflow", at);
  d->owed += claim;
  d->depth++;
  lua_createtable(L, narr > INT_MAX ? INT_MAX : (int)narr, npairs > INT_MAX ? INT_MAX : (int)npairs);
  for (uint64_t i = 1; i <= narr; i++) {
    d->owed -= 1;
    if (dec_value(d) != 0) return -1;
    lua_rawseti(L, -2, (lua_Integer)i);
  }
  for (uint64_t i = 0; i < npairs; i++) {
    const unsigned char *kat = d->p;
    d->owed -= 2;
    if (dec_value(d) != 0) return -1;
    if (lua_type(L, -1) == LUA_TNIL) return dec_fail(d, "table key is nil", kat);
    if (lua_type(L, -1) == LUA_TNUMBER && !lua_isinteger(L, -1)) {
      lua_Number k = lua_tonumber(L, -1);
      if (k != k) return dec_fail(d, "table key is NaN", kat);
    }
    if (dec_value(d) != 0) return -1;
    lua_rawset(L, -3);
  }
  d->depth--;
  return 0;
}

static int dec_value(decoder *d) {
  lua_State *L = d->L;
  const unsigned char *at = d->p;
  unsigned c;
  static const int width[] = {1, 2, 4, 8};
  if (d->p >= d->end) return dec_fail(d, "truncated", at);
  c = *d->p++;
  if (c <= 0x7f) {
    lua_pushinteger(L, (lua_Integer)c);
    return 0;
  }
  if (c >= 0xe0) {
    lua_pushinteger(L, (lua_Integer)c - 256);
    return 0;
  }
  if (c < T_FIXMAP) return dec_str(d, c & 0x1f, at);
  if (c < T_FIXARRAY) return dec_table(d, 0, c & 0x0f, at);
  if (c < T_NIL) return dec_table(d, c & 0x0f, 0, at);
  switch (c) {
  case T_NIL:
    lua_pushnil(L);
    return 0;
  case T_FALSE:
  case T_TRUE:
    lua_pushboolean(L, c == T_TRUE);
    return 0;
  case T_INT8:
  case T_INT16:
  case T_INT32:
  case T_INT64: {
    int w = width[c - T_INT8];
    uint64_t u;
    if (LEFT(d) < (size_t)w) return dec_fail(d, "truncated integer", at);
    u = get_le(d->p, w);
    d->p += w;
    /* Sign-extend from w bytes without relying on signed shifts. */
    if (w < 8 && (u >> (8 * w - 1)) & 1) u |= ~(uint64_t)0 << (8 * w);
    lua_pushinteger(L, (lua_Integer)u);
    return 0;
  }
  case T_FLOAT32: {
    uint32_t u;
    float f;
    if (LEFT(d) < 4) return dec_fail(d, "truncated float", at);
    u = (uint32_t)get_le(d->p, 4);
    d->p += 4;
    memcpy(&f, &u, 4);
    lua_pushnumber(L, (lua_Number)f);
    return 0;
  }
  case T_FLOAT64: {
    uint64_t u;
    double x;
    if (LEFT(d) < 8) return dec_fail(d, "truncated float", at);
    u = get_le(d->p, 8);
    d->p += 8;
    memcpy(&x, &u, 8);
    lua_pushnumber(L, (lua_Number)x);
    return 0;
  }
  case T_STR8:
  case T_STR16:
  case T_STR32:
  case T_STR64: {
    int w = width[c - T_STR8];
    uint64_t n;
    if (LEFT(d) < (size_t)w) return dec_fail(d, "truncated string length", at);
    n = get_le(d->p, w);
    d->p += w;
    return dec_str(d, n, at);
  }
  case T_TABLE: {
    uint64_t narr, npairs;
    if (dec_varint(d, &narr) != 0 || dec_varint(d, &npairs) != 0) return -1;
    return dec_table(d, narr, npairs, at);
  }
  default:
    return dec_fail(d, "bad tag", at);
  }
}

int cl_codec_decode(lua_State *L, const char *p, size_t len) {
  decoder d;
  int base = lua_gettop(L);
  d.L = L;
  d.start = d.p = (const unsigned char *)p;
  d.end = d.start + len;
  d.owed = 0;
  d.tables_left = CL_CODEC_MAX_TABLES;
  d.depth = 0;
  d.err = NULL;
  d.erroff = 0;
  if (!lua_checkstack(L, 4)) {
    lua_pushliteral(L, "malformed message: Lua stack overflow");
    return -1;
  }
  if (dec_value(&d) == 0) {
    if (d.p == d.end) return 0;
    dec_fail(&d, "trailing bytes", d.p);
  }
  lua_settop(L, base);
  lua_pushfstring(L, "malformed message: %s at byte %I", d.err, (lua_Integer)d.erroff);
  return -1;
}

/* ==================================================================== Lua API */

/* core.encode(v) -> string; raises "encode: <path> is a <type>". */
static int l_encode(lua_State *L) {
  cl_buf b = {NULL, 0, 0};
  lua_settop(L, 1);
  if (cl_codec_encode(L, 1, &b, "value") != 0) {
    cl_buf_free(&b);
    lua_pushliteral(L, "encode: ");
    lua_insert(L, -2);
    lua_concat(L, 2);
    return lua_error(L);
  }
  lua_pushlstring(L, b.data ? b.data : "", b.len);
  cl_buf_free(&b);
  return 1;
}

/* core.decode(s) -> value, or nil, errmsg when s is malformed. */
static int l_decode(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  if (cl_codec_decode(L, s, len) != 0) {
    lua_pushnil(L);
    lua_insert(L, -2);
    return 2;
  }
  return 1;
}

void cl_open_codec(lua_State *L) {
  lua_pushcfunction(L, l_encode);
  lua_setfield(L, -2, "encode");
  lua_pushcfunction(L, l_decode);
  lua_setfield(L, -2, "decode");
}
