rockspec_format = "3.0"
package = "luacluster"
version = "scm-1"
source = {
  url = "git+file:///work/main",
}
description = {
  summary = "Node's cluster module for Lua 5.4: a libuv C core that forks workers, shares server ports and carries messages, with a scriptable supervisor.",
  license = "MIT",
}
dependencies = {
  "lua >= 5.4, < 5.5",
}
external_dependencies = {
  LIBUV = { header = "uv.h", library = "uv" },
}
build = {
  type = "builtin",
  modules = {
    ["cluster.core"] = {
      sources = {
        "csrc/accept.c", "csrc/alloc.c", "csrc/channel.c", "csrc/codec.c", "csrc/core.c", "csrc/idle.c",
        "csrc/loop.c", "csrc/process.c", "csrc/rr.c", "csrc/signal.c", "csrc/stream.c", "csrc/sys.c",
        "csrc/timer.c", "csrc/tty.c", "csrc/udp.c", "csrc/util.c",
      },
      libraries = { "uv", "pthread", "dl" },
      incdirs = { "$(LIBUV_INCDIR)" },
      libdirs = { "$(LIBUV_LIBDIR)" },
    },
    ["cluster"] = "lua/cluster/init.lua",
    ["cluster.emitter"] = "lua/cluster/emitter.lua",
    ["cluster.errors"] = "lua/cluster/errors.lua",
    ["cluster.loop"] = "lua/cluster/loop.lua",
    ["cluster.worker"] = "lua/cluster/worker.lua",
    ["cluster.master"] = "lua/cluster/master.lua",
    ["cluster.child"] = "lua/cluster/child.lua",
    ["cluster.repl"] = "lua/cluster/repl.lua",
    ["cluster.net"] = "lua/cluster/net.lua",
    ["cluster.idle_timeout"] = "lua/cluster/idle_timeout.lua",
    ["cluster.dgram"] = "lua/cluster/dgram.lua",
    ["cluster.sharing"] = "lua/cluster/sharing.lua",
    ["cluster.signals"] = "lua/cluster/signals.lua",
    ["cluster.output"] = "lua/cluster/output.lua",
    ["cluster.stats"] = "lua/cluster/stats.lua",
    ["cluster.supervise"] = "lua/cluster/supervise.lua",
  },
}
