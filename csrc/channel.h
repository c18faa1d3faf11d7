/* The IPC channel between master and worker: framed messages over a libuv IPC pipe. */
#ifndef CLUSTER_CHANNEL_H
#define CLUSTER_CHANNEL_H
#include "util.h"

/* Frame: 4-byte little-endian payload length, 1 flag byte, payload (codec.h). */
#define CL_FRAME_HEADER 5
#define CL_FRAME_INTERNAL 0x01 /* cluster's own message, never shown to user listeners */
#define CL_FRAME_HANDLE 0x02   /* a file descriptor travels with this frame */

typedef struct cl_channel cl_channel;

/* Pushes a new channel userdata whose pipe is initialised (ipc) but not yet open;
 * the caller connects it (uv_spawn's stdio, or uv_pipe_open). */
cl_channel *cl_channel_push_new(lua_State *L);
uv_pipe_t *cl_channel_pipe(cl_channel *ch);
#endif
