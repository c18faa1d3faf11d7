/* Stream (TCP, unix pipe) and UDP handles, as seen by other C files (the channel). */
#ifndef CLUSTER_STREAM_H
#define CLUSTER_STREAM_H
#include "util.h"

/* Pushes a new, initialised, unconnected handle userdata of the given kind (UV_TCP,
 * UV_NAMED_PIPE without ipc, UV_UDP) so that a received descriptor can be accepted
 * into it with uv_accept. Returns its uv handle, or NULL (pushing nil) for other kinds. */
uv_handle_t *cl_stream_new(lua_State *L, uv_handle_type type);

/* Sends every stream's held bytes (the writes of this turn, see stream.c): at the end
 * of a run of the loop. */
void cl_stream_flush_all(void);

/* Pushes a new cluster.udp userdata, initialised with uv_udp_init_ex(family), where
 * family is AF_INET, AF_INET6 (the socket is created at once) or AF_UNSPEC (created
 * at bind or accept). Returns its uv handle, or NULL (pushing luv's triple
 * nil, msg, code: 3 values) when the socket could not be created. */
uv_handle_t *cl_udp_new(lua_State *L, int family);

/* Parses a numeric IPv4/IPv6 address, or "localhost" (127.0.0.1), with a port into
 * *ss. Returns 0 or a libuv error (UV_EINVAL) when host is not numeric. Shared by
 * stream.c and udp.c. */
int cl_parse_addr(const char *host, int port, struct sockaddr_storage *ss);

/* Pushes address, port, family ("IPv4"|"IPv6") of a socket address: 3 values (nils
 * for another family). */
void cl_push_sockaddr_values(lua_State *L, const struct sockaddr *sa);

/* Pushes {address=, port=, family="IPv4"|"IPv6"} for a socket address. */
void cl_push_sockaddr(lua_State *L, const struct sockaddr *sa);
#endif
