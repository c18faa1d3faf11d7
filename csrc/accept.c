/* Accepting with the peer's address. libuv accepts a listening TCP stream's connections
 * with accept4(fd, NULL, NULL, ...), so each connection's remote address then costs a
 * getpeername: one system call per connection that the accept could have answered. A
 * listening TCP stream's watcher here runs libuv's accept loop (uv__server_io) with an
 * address: the same calls in the same order (accept until EAGAIN; ECONNABORTED and
 * EINTR skipped; each connection put in accepted_fd for connection_cb, which accepts it
 * with uv_accept), keeping the peer's address until that uv_accept takes the
 * descriptor. Any other accept error goes to libuv's own loop, which meets it again
 * and handles it as it always does (the EMFILE trick, connection_cb with the error).
 *
 * The watcher's callback, accepted_fd and connection_cb are fields of libuv's public
 * stream struct, but what they mean is its internals: so only the versions this was
 * read against get it (cl_libuv_internals_known, util.c), built and running alike. Elsewhere
 * the stream keeps libuv's loop and the address is asked of the kernel. */
#define _GNU_SOURCE /* accept4 */
#include "util.h"

#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <sys/socket.h>

static uv__io_cb libuv_server_io; /* libuv's own accept loop, as uv_listen installed it */

/* The connection being handed to connection_cb, and its peer. */
static struct {
  uv_stream_t *server;
  int fd; /* -1 when none */
  struct sockaddr_storage addr;
} pending = {NULL, -1, {0}};

static void server_io(uv_loop_t *loop, uv__io_t *w, unsigned int events) {
  uv_stream_t *server = (uv_stream_t *)((char *)w - offsetof(uv_stream_t, io_watcher));
  /* connection_cb may close the server: its descriptor is then -1 (and it takes or
   * closes each connection: accepted_fd is -1 again when it returns) */
  while (server->io_watcher.fd != -1 && server->accepted_fd == -1) {
    socklen_t len = sizeof pending.addr;
    int fd = accept4(server->io_watcher.fd, (struct sockaddr *)&pending.addr, &len,
                     SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      libuv_server_io(loop, w, events);
      return;
    }
    pending.server = server;
    pending.fd = fd;
    server->accepted_fd = fd;
    server->connection_cb(server, 0); /* (which accepts it or closes it: stream.c) */
    pending.fd = -1;
  }
}

/* libuv's UV_TCP_SINGLE_ACCEPT (a pause after each accept, to let other processes
 * accept from a shared socket) lives in its own loop: with it set, that loop stays. */
static int single_accept(void) {
  static int cached = -1;
  if (cached < 0) {
    const char *v = getenv("UV_TCP_SINGLE_ACCEPT");
    cached = v != NULL && atoi(v) != 0;
  }
  return cached;
}

void cl_accept_with_peer(uv_tcp_t *server) {
  if (!cl_libuv_internals_known() || server->connection_cb == NULL || single_accept()) return;
  uv__io_cb current = server->io_watcher.cb;
  if (current == server_io) return;
  if (libuv_server_io == NULL) libuv_server_io = current;
  else if (current != libuv_server_io) return; /* not the loop this was read against */
  server->io_watcher.cb = server_io;
}

const struct sockaddr *cl_accepted_peer(uv_tcp_t *server) {
  if (pending.fd == -1 || pending.server != (uv_stream_t *)server || server->accepted_fd != pending.fd)
    return NULL;
  return (const struct sockaddr *)&pending.addr;
}
