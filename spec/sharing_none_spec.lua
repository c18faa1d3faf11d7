-- Port sharing under SCHED_NONE: the master binds and passes the bound socket to every
-- worker on the key, and the workers accept themselves. (The policy freezes at the first
-- fork in a process; busted loads the cluster module afresh for each spec file, so this
-- file sets it before its first fork.) Ports of Node's test-cluster-shared-handle-bind-error,
-- -server-restart-none, -disconnect-race, and the SCHED_NONE side of -net-listen,
-- -net-server-drop-connection (maxConnections: here the worker drops, with 'drop'),
-- -net-listen-relative-path, -eaddrinuse, -bind-privileged-port, -worker-wait-server-close.
local cluster = require "cluster"
local core = require "cluster.core"
local net = require "cluster.net"
local H = require "helper"
local S = require "fixtures.share_lib"

cluster.schedulingPolicy = cluster.SCHED_NONE

local HAS_IPV6 = S.has_ipv6()
local at, ask, answered_by, pids_of = S.at, S.ask, S.answered_by, S.pids_of
local local_server, wait_exit = S.local_server, S.wait_exit
local before, after, tmpdir = S.scaffold()

describe("sharing, SCHED_NONE", function()
  before_each(before)
  after_each(after)

  it("is the policy in force", function()
    S.fork(1)
    assert.equal(cluster.SCHED_NONE, cluster._policy())
  end)

  it("workers accept on the socket the master bound and passed them: both hold it, and every connection is answered by a worker", function()
    local ws = S.fork(2)
    local rs = S.listen_all(ws, "n", at(0))
    local port = rs[1].address.port
    assert.equal(port, rs[2].address.port)
    if S.sh("command -v ss >/dev/null 2>&1") then
      local holders = S.ss_holders(port)
      assert.is_true(holders[ws[1].process.pid], "worker 1 does not hold the listening socket")
      assert.is_true(holders[ws[2].process.pid], "worker 2 does not hold the listening socket")
    end
    local pids = pids_of(ws)
    local by, total, failures = S.tally(S.clients(100, at(port), 10))
    assert.same({}, failures)
    assert.equal(100, total)
    for pid in pairs(by) do assert.is_truthy(pids[pid]) end
  end)

  it("a worker's sockets carry the connection's addresses: IPv4, IPv6, and a dual-stack listener's mapped IPv4 client", function()
    S.check_addresses(S.fork(1)[1])
  end)

  it("so do they with UV_TCP_SINGLE_ACCEPT=1 (libuv's own accept loop, which returns no address)", function()
    S.check_addresses(S.fork(1, { UV_TCP_SINGLE_ACCEPT = "1" })[1])
  end)

  it("listening-port (Node test-cluster-listening-port): 'listening' reaches the master with the real port and addressType 4, 6, -1", function()
    local w = S.fork(1)[1]
    local seen = {}
    cluster.on("listening", function(_, a) seen[#seen + 1] = a end)
    local r = S.listen(w, "v4", at(0))
    assert.is_true(H.wait_until(function() return #seen == 1 end, 3000))
    assert.same({ address = "127.0.0.1", port = r.address.port, addressType = 4 }, seen[1])
    assert.is_true(seen[1].port > 0)
    if HAS_IPV6 then
      r = S.listen(w, "v6", at(0, "::1"))
      assert.is_true(H.wait_until(function() return #seen == 2 end, 3000))
      assert.same({ address = "::1", port = r.address.port, addressType = 6 }, seen[2])
    end
    local path = tmpdir() .. "/n.sock"
    S.listen(w, "unix", { path = path })
    assert.is_true(H.wait_until(function() return #seen == (HAS_IPV6 and 3 or 2) end, 3000))
    assert.same({ address = path, addressType = -1 }, seen[#seen])
    assert.equal(w.process.pid, answered_by(ask({ path = path })))
  end)

  it("net-listen (Node test-cluster-net-listen): a worker's listen() with no arguments listens on a port through the master; the worker then disconnects and exits 0", function()
    S.listen_without_arguments()
  end)

  it("the n-th listen(0) in every worker gets the same port; exclusive=true gets its own", function()
    local ws = S.fork(2)
    local a = S.listen_all(ws, "a", at(0))
    local b = S.listen_all(ws, "b", at(0))
    local x = S.listen_all(ws, "x", { port = 0, host = "127.0.0.1", exclusive = true })
    assert.equal(a[1].address.port, a[2].address.port)
    assert.equal(b[1].address.port, b[2].address.port)
    assert.are_not.equal(a[1].address.port, b[1].address.port)
    assert.are_not.equal(x[1].address.port, x[2].address.port)
    for i, w in ipairs(ws) do assert.equal(w.process.pid, answered_by(ask(at(x[i].address.port)))) end
  end)

  it("a listen on \"localhost\" and one on \"127.0.0.1\" are one address: two workers share the port (Node resolves the name first)", function()
    S.localhost_is_one_address()
  end)

  it("a server that closes and listens again keeps nothing of its earlier listens", function()
    S.relisten_keeps_nothing()
  end)

  it("the master's 'listening' for a relative unix path has the absolute path (Node's path.resolve in the worker)", function()
    S.relative_path_heard_absolute(tmpdir())
  end)

  it("a server unref()'d before or after it listens does not keep its worker alive; a referenced one does", function()
    S.unrefd_server_lets_worker_exit()
  end)

  it("a server closed while its shared listen is under way can listen again at once: 'close', then 'listening', and it serves (as in Node)", function()
    S.listen_again_after_close_while_pending()
  end)

  it("ipv6Only and backlog pass through to the socket the master binds", function()
    local w = S.fork(1)[1]
    if S.sh("command -v ss >/dev/null 2>&1") then
      local r = S.listen(w, "b", { port = 0, host = "127.0.0.1", backlog = 9 })
      assert.equal(9, S.ss_backlog(r.address.port))
    end
    if HAS_IPV6 then
      local only = S.listen(w, "only", { port = 0, host = "::", ipv6Only = true })
      assert.equal("listening", only.ev)
      local s = local_server(only.address.port, "0.0.0.0")
      assert.equal(only.address.port, s:address().port)
      assert.equal(w.process.pid, answered_by(ask(at(only.address.port, "::1"))))
    end
  end)

  it("net-listen-relative-path (Node test-cluster-net-listen-relative-path): a relative unix path is bound in the worker's cwd and removed when the last worker closes it, or exits without closing it", function()
    local sockdir = tmpdir() .. "/unix-socket-dir"
    assert(S.sh("mkdir " .. H.shell_quote(sockdir)))
    local name = string.rep("A", 100 - #"./unix-socket-dir" - 1)
    local ws = S.fork(2)
    for _, w in ipairs(ws) do
      w:send({ cmd = "chdir", dir = sockdir })
      assert.is_true(assert(S.take(w, "chdir")).ok)
    end
    local rs = S.listen_all(ws, "rel", { path = name })
    assert.equal("listening", rs[1].ev, rs[1].message)
    assert.equal("listening", rs[2].ev, rs[2].message)
    assert.is_true(S.exists(sockdir .. "/" .. name))
    assert.is_false(S.exists(H.ROOT .. "/" .. name))
    local here = core.cwd()
    core.chdir(sockdir)
    local r = S.client({ path = name })
    core.chdir(here)
    assert.is_true(H.wait_until(function() return r.done end, 5000))
    assert.is_truthy(pids_of(ws)[answered_by(r)])
    S.close(ws[1], "rel")
    assert.is_true(S.exists(sockdir .. "/" .. name))
    S.close(ws[2], "rel")
    assert.is_true(H.wait_until(function() return not S.exists(sockdir .. "/" .. name) end, 3000),
      "socket file left behind after the last worker closed it")
    S.unix_socket_gone_with_worker(ws[1], sockdir, name)
  end)

  it("unix paths spelled differently (\"s.sock\", \"./s.sock\", \"/dir//x/../s.sock\") are one socket, shared (Node's path.resolve)", function()
    S.path_spellings_share(tmpdir())
  end)

  it("closing a worker's relative unix socket never unlinks a same-named file in the master's cwd", function()
    local dir = tmpdir()
    local wdir, mdir = dir .. "/worker", dir .. "/master"
    assert(S.sh("mkdir " .. H.shell_quote(wdir) .. " " .. H.shell_quote(mdir)))
    local decoy = io.open(mdir .. "/decoy.sock", "w")
    decoy:write("keep me")
    decoy:close()
    local w = S.fork(1)[1]
    w:send({ cmd = "chdir", dir = wdir })
    assert(S.take(w, "chdir"))
    local here = core.cwd()
    local ok, err = pcall(function()
      core.chdir(mdir)
      assert.equal("listening", S.listen(w, "d", { path = "decoy.sock" }).ev)
      S.close(w, "d")
      H.run_for(50)
    end)
    core.chdir(here)
    assert(ok, err)
    assert.equal("keep me", H.read_file(mdir .. "/decoy.sock"))
    assert.is_false(S.exists(wdir .. "/decoy.sock"))
  end)

  it("a server closed before the master answered its listen never listens: no 'listening' reaches the master and the port is let go", function()
    local w = S.fork(1)[1]
    local heard = 0
    cluster.on("listening", function() heard = heard + 1 end)
    local port = S.free_port()
    w:send({ cmd = "listenclose", tag = "t", opts = at(port) })
    assert(S.take(w, "closed", "t"))
    assert.equal("listening", S.listen(w, "later", at(0)).ev)
    assert.is_true(H.wait_until(function() return heard == 1 end, 3000))
    H.run_for(20)
    assert.equal(1, heard)
    assert.is_false(S.has(w, "listening", "t"))
    local s = local_server(port, "127.0.0.1")
    assert.equal(port, s:address().port)
  end)

  it("shared-handle-bind-error (Node test-cluster-shared-handle-bind-error): a listen on a port another server holds fails with EADDRINUSE, syscall bind, and the worker disconnects and exits 0", function()
    local _, port = local_server(0, "127.0.0.1")
    local w = S.fork(1)[1]
    local r = S.listen(w, "e", at(port))
    assert.equal("error", r.ev)
    assert.equal("EADDRINUSE", r.code)
    assert.equal("bind", r.syscall)
    assert.equal("bind EADDRINUSE 127.0.0.1:" .. port, r.message)
    w:send({ cmd = "disconnect" })
    assert.equal(0, (wait_exit(w)))
  end)

  it("eaddrinuse (Node test-cluster-eaddrinuse): after the port is freed a retry in the same worker succeeds", function()
    local hog, port = local_server(0, "127.0.0.1")
    local w = S.fork(1)[1]
    assert.equal("EADDRINUSE", S.listen(w, "e", at(port)).code)
    S.close_local(hog)
    local r = S.listen(w, "e", at(port))
    assert.equal("listening", r.ev, r.message)
    assert.equal(w.process.pid, answered_by(ask(at(port))))
  end)

  it("a worker with no file descriptor left gets EMFILE on its listen (the master's socket could not arrive) and keeps its channel: the master lets the address go, and once descriptors are free the same listen succeeds", function()
    local w = S.fork(1)[1]
    local pid = w.process.pid
    local restore = S.starve(pid)
    if not restore then pending("no prlimit(1)") return end
    local ok, r = pcall(S.listen, w, "starved", at(0))
    restore()
    assert(ok, r)
    assert.equal("error", r.ev)
    assert.equal("EMFILE", r.code)
    assert.equal("listen", r.syscall)
    assert.equal("127.0.0.1", r.address)
    assert.matches("listen EMFILE 127.0.0.1:0 (the master's socket did not arrive", r.message, 1, true)
    assert.is_false(w:isDead())
    assert.is_true(w:isConnected())
    local again = S.listen(w, "starved", at(0))
    assert.equal("listening", again.ev, again.message)
    assert.equal(pid, answered_by(ask(at(again.address.port))))
  end)

  it("an object a worker sends to a master with no file descriptor left comes as nil, with an EMFILE 'error' on the Worker; the channel goes on, and the next one arrives", function()
    local w = S.fork(1)[1]
    local port = S.listen(w, "x", { port = 0, host = "127.0.0.1", exclusive = true }).address.port
    local errs = {}
    w:on("error", function(e) errs[#errs + 1] = e end)
    local restore = S.starve(core.getpid())
    if not restore then pending("no prlimit(1)") return end
    local ok, got = pcall(function()
      w:send({ cmd = "sendback", tag = "x" })
      return S.take(w, "handle", "x")
    end)
    restore()
    assert(ok, got)
    assert.is_table(got, "the message did not come")
    assert.is_nil(got.handle)
    assert.equal(1, #errs)
    assert.equal("EMFILE", errs[1].code)
    assert.equal("recvmsg", errs[1].syscall)
    assert.is_false(w:isDead())
    w:send({ cmd = "sendback", tag = "x" })
    local second = assert(S.take(w, "handle", "x"))
    assert.equal(net.Server, getmetatable(second.handle))
    assert.equal(port, second.handle:address().port)
    S.close_local(second.handle)
  end)

  it("an object the master sends to a worker with no file descriptor left comes as nil, with an EMFILE 'error' on cluster.worker; the next one arrives", function()
    local w = S.fork(1)[1]
    local server, port = local_server(0, "127.0.0.1")
    local restore = S.starve(w.process.pid)
    if not restore then pending("no prlimit(1)") return end
    local ok, err = pcall(function()
      w:send({ tag = "lost" }, server)
      assert(S.take(w, "nohandle", "lost"), "the message did not come")
    end)
    restore()
    assert(ok, err)
    local e = assert(S.take(w, "workererror"))
    assert.equal("EMFILE", e.code)
    assert.equal("recvmsg", e.syscall)
    w:send({ tag = "kept" }, server)
    local got = assert(S.take(w, "got"))
    assert.equal("server", got.kind)
    assert.equal(port, got.address.port)
  end)

  it("a master whose working directory is gone gives a worker's too-long relative unix path ENOENT instead of raising", function()
    S.master_without_cwd_survives(tmpdir(), { CLUSTER_SCHED_POLICY = "none" })
  end)

  it("bind-privileged-port (Node test-cluster-bind-privileged-port): without privileges a worker's listen and bind on port 80 get EACCES, syscall bind, and the worker then disconnects and exits 0", function()
    local lines, why = S.unprivileged_masters({ "listen", "bind" }, 80, { CLUSTER_SCHED_POLICY = "none" })
    if not lines then pending(why) return end
    assert.same({ "error EACCES bind\nexit 0 nil\n", "error EACCES bind\nexit 0 nil\n" }, lines)
  end)

  it("server-restart-none (Node test-cluster-server-restart-none): a worker closes and listens again with the same server on the port it shares, then both exit 0", function()
    local w1 = S.fork(1)[1]
    local first = S.listen(w1, "s", { port = 0 })
    local w2 = S.fork(1)[1]
    local shared = S.listen(w2, "s", { port = 0 })
    assert.equal(first.address.port, shared.address.port)
    S.close(w2, "s")
    local again = S.relisten(w2, "s", { port = 0 })
    assert.equal("listening", again.ev, again.message)
    assert.equal(shared.address.port, again.address.port)
    S.close(w2, "s")
    w2:send({ cmd = "disconnect" })
    assert.equal(0, (wait_exit(w2)))
    w1:disconnect()
    assert.equal(0, (wait_exit(w1)))
  end)

  it("disconnect-race (Node test-cluster-disconnect-race): worker 1 listens and is disconnected as worker 2 is forked; worker 2, disconnected at 'online', sends its listen(0) meanwhile: both exit 0 and the master keeps no socket", function()
    S.disconnect_race()
  end)

  for _, case in ipairs(S.leaving_cases()) do it(case.name, function() case.run(tmpdir) end) end

  it("a worker's server at its maxConnections accepts and closes what is over, with 'drop' and the client's address", function()
    local w = S.fork(1)[1]
    local port = S.listen(w, "max", at(0), nil, "hold", nil, 1).address.port
    local held = S.client(at(port), nil, true)
    assert.is_true(H.wait_until(function() return held.data ~= "" end, 5000))
    assert.equal(w.process.pid, answered_by(held))
    local over = S.client(at(port), nil, true)
    assert.is_true(H.wait_until(function() return over.done end, 5000), "the connection over the limit was left open")
    assert.equal("", over.data)
    local drop = S.take(w, "drop", "max")
    assert.is_truthy(drop)
    assert.same({ remoteAddress = "127.0.0.1", remotePort = over.sock.localPort, remoteFamily = "IPv4",
                  localAddress = "127.0.0.1", localPort = port }, drop.data)
    held.sock:close()
    assert.is_true(H.wait_until(function() return held.done end, 5000))
    H.run_for(50) -- the worker sees the client's end and closes its side
    assert.equal(w.process.pid, answered_by(ask(at(port))))
  end)

  it("a worker that closed its server no longer accepts; when the last one closes, the master drops the socket and connecting fails", function()
    local ws = S.fork(2)
    local port = S.listen_all(ws, "c", at(0))[1].address.port
    S.close(ws[1], "c")
    local by, total = S.tally(S.clients(20, at(port), 4))
    assert.equal(20, total)
    assert.same({ [ws[2].process.pid] = 20 }, by)
    S.close(ws[2], "c")
    H.run_for(20)
    assert.equal("ECONNREFUSED", ask(at(port)).err.code)
  end)

  it("worker-wait-server-close (Node test-cluster-worker-wait-server-close): after disconnect() the open connection is still served and delays the exit; 'disconnect' comes after the server closed", function()
    local log = H.tmpname("log")
    local w = S.fork(1, { SHARE_LOG = log })[1]
    local port = S.listen(w, "e", at(0), nil, "echo").address.port
    local r = S.client(at(port), "hello\n", true)
    assert.is_true(H.wait_until(function() return r.data == "hello\n" end, 3000))
    local disconnected = false
    w:on("disconnect", function() disconnected = true end)
    w:disconnect()
    H.run_for(50)
    assert.equal("ECONNREFUSED", ask(at(port)).err.code)
    r.sock:write("again\n")
    assert.is_true(H.wait_until(function() return r.data == "hello\nagain\n" end, 3000))
    assert.is_false(disconnected)
    assert.is_true(H.alive(w.process.pid))
    r.sock:close()
    assert.equal(0, (wait_exit(w)))
    assert.is_true(H.wait_until(function() return disconnected end, 3000))
    assert.equal("close e\ndisconnect\n", H.read_file(log))
    os.remove(log)
  end)

  it("UDP binds share the master's socket under SCHED_NONE too", function()
    local ws = S.fork(2)
    local ports = {}
    for i, w in ipairs(ws) do
      w:send({ cmd = "bind", tag = "u", port = 0, address = "127.0.0.1" })
      ports[i] = assert(S.take(w, "bound", "u")).address.port
    end
    assert.equal(ports[1], ports[2])
    local pids = pids_of(ws)
    for _ = 1, 10 do assert.is_truthy(pids[S.udp_ask(ports[1])]) end
  end)

  it("leaks nothing: after 1000 connections the master's and workers' descriptor counts return to where they were", function()
    local ws = S.fork(2)
    local port = S.listen_all(ws, "leak", at(0))[1].address.port
    S.clients(10, at(port), 2)
    local me = core.getpid()
    local before = { S.settled_fd_count(me), S.settled_fd_count(ws[1].process.pid), S.settled_fd_count(ws[2].process.pid) }
    local _, total = S.tally(S.clients(1000, at(port), 50, nil, 30000))
    assert.equal(1000, total)
    local now
    local same = H.wait_until(function()
      collectgarbage()
      now = { S.fd_count(me), S.fd_count(ws[1].process.pid), S.fd_count(ws[2].process.pid) }
      return now[1] == before[1] and now[2] == before[2] and now[3] == before[3]
    end, 3000, 50)
    assert.is_true(same, ("fds before %s, after %s"):format(table.concat(before, "/"), table.concat(now, "/")))
  end)

  -- The epoll event masks (/proc/PID/fdinfo of its epoll descriptors) under which a
  -- process watches the listening TCP socket on `port`, as numbers.
  local function listen_watch_masks(pid, port)
    local inodes = {}
    for _, file in ipairs { "/proc/net/tcp", "/proc/net/tcp6" } do
      local f = io.open(file)
      if f then
        for line in f:lines() do
          local lport, state, inode = line:match("^%s*%d+:%s+%x+:(%x+)%s+%x+:%x+%s+(%x+)%s+%S+%s+%S+%s+%S+%s+%S+%s+%S+%s+(%d+)")
          if lport and tonumber(lport, 16) == port and state == "0A" then inodes[tonumber(inode)] = true end
        end
        f:close()
      end
    end
    local masks = {}
    local fds = io.popen("ls /proc/" .. pid .. "/fd")
    for fd in fds:lines() do
      local info = io.open("/proc/" .. pid .. "/fdinfo/" .. fd)
      if info then
        for line in info:lines() do
          local events, ino = line:match("^tfd:%s+%d+ events:%s+(%x+) .* ino:(%x+)")
          if events and inodes[tonumber(ino, 16)] then masks[#masks + 1] = tonumber(events, 16) end
        end
        info:close()
      end
    end
    fds:close()
    return masks
  end

  it("a connection wakes one waiting worker (EPOLLEXCLUSIVE), and a busy worker holds none up: the other answers them all", function()
    local EPOLLEXCLUSIVE = 1 << 28
    local ws = S.fork(2)
    local port = S.listen_all(ws, "x", at(0))[1].address.port
    local _, total = S.tally(S.clients(20, at(port), 4))
    assert.equal(20, total)
    for i, w in ipairs(ws) do
      local masks = listen_watch_masks(w.process.pid, port)
      assert.equal(1, #masks, "worker " .. i .. " watches the listening socket once")
      assert.is_true(masks[1] & EPOLLEXCLUSIVE ~= 0, ("worker %d's mask: %x"):format(i, masks[1]))
    end
    -- worker 1 stops polling for 1.5 s: each connection must wake worker 2
    S.block(ws[1], 1500)
    local started = core.hrtime()
    local by, n, failures = S.tally(S.clients(20, at(port), 1))
    assert.same({}, failures)
    assert.equal(20, n)
    assert.same({ [ws[2].process.pid] = 20 }, by)
    assert.is_true(core.hrtime() - started < 1.2, "the connections waited for the busy worker")
  end)
end)
