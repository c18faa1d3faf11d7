/* The IPC channel between master and worker: framed messages over a libuv IPC pipe. */
#ifndef CLUSTER_CHANNEL_H
#define CLUSTER_CHANNEL_H
#include "util.h"

/* Frame: 4-byte little-endian payload length, 1 flag byte, payload (codec.h). */
#define CL_FRAME_HEADER 5
#define CL_FRAME_INTERNAL 0x01 /* cluster's own message, never shown to user listeners */
#define CL_FRAME_HANDLE 0x02   /* a file descriptor travels with this frame */
/* Round-robin hand-off, handled in C on the master's side: master -> worker carries a
 * connection (payload: u32 rr id, u32 seq); worker -> master answers it (payload:
 * u32 rr id, u32 seq, u8 accepted). No Lua runs for these frames in the master. */
#define CL_FRAME_CONN 0x04
/* The worker's heartbeat (empty payload), sent by a C timer in the worker's loop and
 * noted in C by the master: a worker whose loop is stuck stops sending it. */
#define CL_FRAME_BEAT 0x08

typedef struct cl_channel cl_channel;

/* Pushes a new channel userdata whose pipe is initialised (ipc) but not yet open;
 * the caller connects it (uv_spawn's stdio, or uv_pipe_open). */
cl_channel *cl_channel_push_new(lua_State *L);
uv_pipe_t *cl_channel_pipe(cl_channel *ch);

/* The channel in the userdata at idx, or NULL if it is not an open channel. */
cl_channel *cl_channel_test(lua_State *L, int idx);
int cl_channel_is_open(cl_channel *ch);

/* A hand-off frame: header + u32 rr id + u32 seq + u8 kind (1 tcp, 2 unix pipe), and
 * for TCP the connection's addresses, which the master's accept4 learnt for free:
 * u8 family (4 or 6), then remote and local as u16 port (network order) + 4 or 16
 * address bytes. The worker fills the socket's address fields from them without a
 * system call. Returns the frame's length (at most CL_CONN_FRAME_MAX). */
#define CL_CONN_FRAME_MAX (CL_FRAME_HEADER + 9 + 1 + 2 * (2 + 16))
size_t cl_channel_conn_frame(char *out, uint32_t rr_id, uint32_t seq, int is_tcp,
                             const struct sockaddr *remote, const struct sockaddr *local);

/* At most this many connections travel in one message: libuv's receiving side takes
 * up to 64 descriptors per read. */
#define CL_CONN_BATCH_MAX 32

/* Sends n hand-off frames (len bytes in all, built by cl_channel_conn_frame) with their n
 * descriptors in one message, when the channel has nothing queued. Returns
 * CL_CONN_SENT, UV_EAGAIN (nothing was sent: the channel is backed up; send them one
 * by one with cl_channel_send_conn) or another libuv error. */
int cl_channel_send_conns(cl_channel *ch, const char *frames, size_t len, const int *fds, int n);

/* Sends one connection (its frame and its handle) behind whatever the channel has
 * queued; done(arg, status) runs once written. Returns 0, CL_CONN_SENT (written already;
 * done is not called) or a libuv error (then done is not called). */
#define CL_CONN_SENT 1
int cl_channel_send_conn(cl_channel *ch, const char *frame, size_t len, uv_stream_t *conn,
                         void (*done)(void *arg, int status), void *arg);

/* A worker's answer to a hand-off (the answer frame's last byte). */
#define CL_CONN_REFUSED 0       /* its server is not listening: hand it to another worker */
#define CL_CONN_ACCEPTED 1
#define CL_CONN_NO_DESCRIPTOR 2 /* the descriptor did not arrive (the worker is out of
                                   descriptors, so the kernel dropped it): hand it on, and
                                   send this worker one descriptor per message from now on */

/* Called (master side) for every answer to a connection hand-off. */
typedef void (*cl_conn_answer_fn)(cl_channel *ch, uint32_t rr_id, uint32_t seq, int answer);
void cl_channel_on_conn_answer(cl_conn_answer_fn fn);
#endif
