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
 * A listening socket shared with other processes (SCHED_NONE: every worker accepts
 * from the master's socket) wakes every process waiting on it for each connection,
 * and all but one find nothing to accept. So as it starts listening here, the socket
 * joins the loop's epoll set with EPOLLEXCLUSIVE (Linux 4.5), as uwsgi and unicorn
 * register theirs: a new connection wakes one process waiting in epoll_wait, and those
 * busy meanwhile find it when they next poll. libuv would add the descriptor itself as
 * its next poll begins; the watcher is left as that poll leaves one it added (out of
 * the queue of watchers to register, its events current). libuv touches the
 * registration again only when the watcher's events change, which a listening
 * socket's never do (POLLIN), or after a stop that leaves a connection unaccepted,
 * which on_connection (stream.c) never does: the EPOLL_CTL_MOD that an exclusive
 * registration refuses never comes. Where the kernel refuses the flag, libuv adds the
 * descriptor as usual.
 *
 * The watcher's callback, accepted_fd and connection_cb are fields of libuv's public
 * stream struct, but what they mean is its internals: so only the versions this was
 * read against get it (cl_libuv_internals_known, util.c), built and running alike. Elsewhere
 * the stream keeps libuv's loop and the address is asked of the kernel. */
#define _GNU_SOURCE /* accept4 */
#include "util.h"

#include <errno.h>
#include <stddef.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>

static uv__io_cb libuv_server_io; /* libuv's own accept loop, as uv_listen installed it */

/* The connection being handed to connection_cb, and its peer. */
static struct {
  uv_stream_t *server;
  int fd; /* -1 when none */
  struct sockaddr_storage addr;
} pending = {NULL, -1, {0}};

/* Adds a listening socket's watcher, which uv_listen has just queued for libuv's next
 * poll to add, to the epoll set with EPOLLEXCLUSIVE instead (see above). The watcher's
 * queue links are libuv 1.44's QUEUE: void *[2], next then previous. */
static void add_waking_one(uv_loop_t *loop, uv__io_t *w) {
  if (w->fd < 0 || w->events != 0 || w->pevents != POLLIN) return; /* (not as read against) */
  struct epoll_event e;
  memset(&e, 0, sizeof e);
  e.events = EPOLLIN | EPOLLEXCLUSIVE;
  e.data.fd = w->fd; /* (as libuv registers it) */
  if (epoll_ctl(uv_backend_fd(loop), EPOLL_CTL_ADD, w->fd, &e) != 0) return;
  void **link = w->watcher_queue;
  ((void **)link[1])[0] = link[0]; /* previous->next = next */
  ((void **)link[0])[1] = link[1]; /* next->previous = previous */
  link[0] = link[1] = link;
  w->events = w->pevents;
}

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
  add_waking_one(server->loop, &server->io_watcher);
}

const struct sockaddr *cl_accepted_peer(uv_tcp_t *server) {
  if (pending.fd == -1 || pending.server != (uv_stream_t *)server || server->accepted_fd != pending.fd)
    return NULL;
  return (const struct sockaddr *)&pending.addr;
}
