/* The floor for a message round trip between two processes on this machine: 20-byte
 * messages over an AF_UNIX stream socketpair (what a libuv IPC pipe is), blocking
 * read/write, no event loop, no codec. Not run by bench/run (which builds nothing);
 * see bench/RESULTS.md:
 *   cc -O2 -o /tmp/pingpong bench/floor/pingpong.c && /tmp/pingpong 2   # seconds */
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
  double dur = argc > 1 ? atof(argv[1]) : 2.0;
  int sv[2]; char buf[20] = {0};
  socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
  pid_t pid = fork();
  if (pid == 0) {
    close(sv[0]);
    for (;;) { if (read(sv[1], buf, 20) != 20) _exit(0); if (write(sv[1], buf, 20) != 20) _exit(0); }
  }
  close(sv[1]);
  long n = 0; double t0 = now(), t;
  do { for (int i = 0; i < 256; i++) { write(sv[0], buf, 20); read(sv[0], buf, 20); } n += 256; } while ((t = now()) - t0 < dur);
  close(sv[0]); waitpid(pid, NULL, 0);
  printf("result %.0f\n", n / (t - t0));
  return 0;
}
