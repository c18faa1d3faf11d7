-- Port sharing under SCHED_RR (the default): workers listen through the master, which
-- accepts and hands each connection to a worker (csrc/rr.c). Real sockets on loopback
-- and unix paths. Ports of Node's test-cluster-listening-port, -net-listen,
-- -net-listen-relative-path, -dgram-reuse, -eaddrinuse, -bind-twice,
-- -bind-privileged-port, -server-restart-rr, -rr-domain-listen, -accept-fail,
-- -net-server-drop-connection, -disconnect-race, -worker-wait-server-close,
-- -worker-no-exit, -disconnect. (-dgram-1 and -dgram-2: sharing_dgram_spec.lua;
-- -send-deadlock and -send-handle-twice: sharing_send_spec.lua.)
local cluster = require "cluster"
local net = require "cluster.net"
local dgram = require "cluster.dgram"
local core = require "cluster.core"
local H = require "helper"
local S = require "fixtures.share_lib"

local HAS_IPV6 = S.has_ipv6()

local at, ask, answered_by, pids_of, track = S.at, S.ask, S.answered_by, S.pids_of, S.track
local local_server, wait_exit, ss_backlog = S.local_server, S.wait_exit, S.ss_backlog
local before, after, tmpdir = S.scaffold()

describe("sharing, SCHED_RR", function()
  before_each(before)
  after_each(after)

  it("is the default policy", function()
    assert.equal(cluster.SCHED_RR, cluster.schedulingPolicy)
  end)

  describe("listen in a worker", function()
    it("listening-port (Node test-cluster-listening-port): 'listening' reaches the worker, then the cluster, with the real port and addressType 4, 6, -1, udp4, udp6", function()
      local w = S.fork(1)[1]
      local seen = {}
      w:on("listening", function(a) seen[#seen + 1] = { "worker", a } end)
      cluster.on("listening", function(cw, a)
        assert.equal(w, cw)
        seen[#seen + 1] = { "cluster", a }
      end)
      local function last_pair(n)
        assert.is_true(H.wait_until(function() return #seen >= 2 * n end, 3000))
        local a, b = seen[2 * n - 1], seen[2 * n]
        assert.equal("worker", a[1])
        assert.equal("cluster", b[1])
        assert.same(a[2], b[2])
        return b[2]
      end
      local n = 0

      local r = S.listen(w, "v4", at(0))
      n = n + 1
      local a = last_pair(n)
      assert.same({ address = "127.0.0.1", port = r.address.port, addressType = 4 }, a)
      assert.is_true(a.port > 0)
      assert.equal("listening", w.state)

      if HAS_IPV6 then
        r = S.listen(w, "v6", at(0, "::1"))
        n = n + 1
        a = last_pair(n)
        assert.same({ address = "::1", port = r.address.port, addressType = 6 }, a)
        assert.is_true(a.port > 0)
      end

      local dir = tmpdir()
      local path = dir .. "/lp.sock"
      r = S.listen(w, "unix", { path = path })
      assert.equal("listening", r.ev)
      n = n + 1
      a = last_pair(n)
      assert.same({ address = path, addressType = -1 }, a)

      w:send({ cmd = "bind", tag = "u4", address = "127.0.0.1" })
      local b = assert(S.take(w, "bound", "u4"))
      n = n + 1
      a = last_pair(n)
      assert.same({ address = "127.0.0.1", port = b.address.port, addressType = "udp4" }, a)
      assert.is_true(a.port > 0)

      if HAS_IPV6 then
        w:send({ cmd = "bind", tag = "u6", type = "udp6", address = "::1" })
        b = assert(S.take(w, "bound", "u6"))
        n = n + 1
        a = last_pair(n)
        assert.same({ address = "::1", port = b.address.port, addressType = "udp6" }, a)
      end
    end)

    it("listen(0) with no host reports a real port and addressType 4 or 6", function()
      local w = S.fork(1)[1]
      local got
      cluster.on("listening", function(_, a) got = a end)
      local r = S.listen(w, "any", { port = 0 })
      assert.equal("listening", r.ev)
      assert.is_true(H.wait_until(function() return got ~= nil end, 3000))
      assert.equal(r.address.port, got.port)
      assert.is_true(got.port > 0)
      assert.is_true(got.addressType == 4 or got.addressType == 6)
      assert.equal(w.process.pid, answered_by(ask(at(got.port))))
    end)

    it("net-listen (Node test-cluster-net-listen): a worker's listen() with no arguments listens on a port through the master; the worker then disconnects and exits 0", function()
      S.listen_without_arguments()
    end)

    it("the n-th listen(0) in every worker gets the same port, and each port serves", function()
      local ws = S.fork(2)
      local first = S.listen_all(ws, "a", at(0))
      local second = S.listen_all(ws, "b", at(0))
      assert.equal(first[1].address.port, first[2].address.port)
      assert.equal(second[1].address.port, second[2].address.port)
      assert.are_not.equal(first[1].address.port, second[1].address.port)
      local pids = pids_of(ws)
      for _, port in ipairs { first[1].address.port, second[1].address.port } do
        local by = S.tally(S.clients(10, at(port), 1))
        for pid, count in pairs(by) do
          assert.is_truthy(pids[pid])
          assert.is_true(count > 0)
        end
      end
    end)

    it("a listen on \"localhost\" and one on \"127.0.0.1\" are one address: two workers share the port (Node resolves the name first)", function()
      S.localhost_is_one_address()
    end)

    it("a server that closes and listens again keeps nothing of its earlier listens", function()
      S.relisten_keeps_nothing()
    end)

    it("a round-robin server unref()'d before or after it listens does not keep its worker alive (as a socket of its own would not); a referenced one does", function()
      S.unrefd_server_lets_worker_exit()
    end)

    it("a server closed while its shared listen is under way can listen again at once: 'close', then 'listening', and it serves (as in Node)", function()
      S.listen_again_after_close_while_pending()
    end)

    it("exclusive=true bypasses the master: each worker's listen(0) gets its own port and serves it alone", function()
      local ws = S.fork(2)
      local rs = S.listen_all(ws, "x", { port = 0, host = "127.0.0.1", exclusive = true })
      assert.are_not.equal(rs[1].address.port, rs[2].address.port)
      for i, w in ipairs(ws) do
        local by, total = S.tally(S.clients(6, at(rs[i].address.port), 2))
        assert.equal(6, total)
        assert.same({ [w.process.pid] = 6 }, by)
      end
    end)

    it("ipv6Only passes through: a shared listen on :: with ipv6Only leaves the IPv4 port free, without it the port is taken", function()
      if not HAS_IPV6 then pending("no IPv6 on this host") return end
      local w = S.fork(1)[1]
      local only = S.listen(w, "only", { port = 0, host = "::", ipv6Only = true })
      assert.equal("listening", only.ev)
      local s = local_server(only.address.port, "0.0.0.0")
      assert.equal(only.address.port, s:address().port)
      assert.equal(w.process.pid, answered_by(ask(at(only.address.port, "::1"))))

      local dual = S.listen(w, "dual", { port = 0, host = "::" })
      assert.equal("listening", dual.ev)
      local probe = track(net.createServer())
      local err
      probe:on("error", function(e) err = e end)
      probe:listen(dual.address.port, "0.0.0.0")
      assert.is_true(H.wait_until(function() return err ~= nil end, 3000))
      assert.equal("EADDRINUSE", err.code)
    end)

    it("backlog passes through to the master's listening socket", function()
      if not S.sh("command -v ss >/dev/null 2>&1") then pending("no ss(8)") return end
      local w = S.fork(1)[1]
      local r = S.listen(w, "b", { port = 0, host = "127.0.0.1", backlog = 7 })
      assert.equal(7, ss_backlog(r.address.port))
      local r2 = S.listen(w, "c", at(0), nil)
      assert.equal(511, ss_backlog(r2.address.port))
    end)

    it("net-listen-relative-path (Node test-cluster-net-listen-relative-path): a relative unix path, over 100 bytes absolute, is bound in the worker's cwd and removed when the last worker closes it, or exits without closing it", function()
      local dir = tmpdir()
      local sockdir = dir .. "/unix-socket-dir"
      assert(S.sh("mkdir " .. H.shell_quote(sockdir)))
      local name = string.rep("A", 100 - #"./unix-socket-dir" - 1)
      assert.is_true(#(sockdir .. "/" .. name) > 100)
      local ws = S.fork(2)
      for _, w in ipairs(ws) do
        w:send({ cmd = "chdir", dir = sockdir })
        assert.is_true(assert(S.take(w, "chdir")).ok)
      end
      local rs = S.listen_all(ws, "rel", { path = name })
      assert.equal("listening", rs[1].ev)
      assert.equal("listening", rs[2].ev)
      assert.is_true(S.exists(sockdir .. "/" .. name), "socket not created in the worker's cwd")
      assert.is_false(S.exists(H.ROOT .. "/" .. name), "socket created in the master's cwd")
      -- connect through the relative name (the absolute one is too long for sun_path)
      local here = core.cwd()
      core.chdir(sockdir)
      local r = S.client({ path = name })
      core.chdir(here)
      assert.is_true(H.wait_until(function() return r.done end, 5000))
      assert.is_truthy(pids_of(ws)[answered_by(r)])

      S.close(ws[1], "rel")
      assert.is_true(S.exists(sockdir .. "/" .. name), "removed while a worker still listens")
      S.close(ws[2], "rel")
      assert.is_true(H.wait_until(function() return not S.exists(sockdir .. "/" .. name) end, 3000),
        "socket file left behind after the last worker closed it")
      S.unix_socket_gone_with_worker(ws[1], sockdir, name)
    end)

    it("the master's 'listening' for a relative unix path has the absolute path (Node's path.resolve in the worker)", function()
      S.relative_path_heard_absolute(tmpdir())
    end)

    it("unix paths spelled differently (\"s.sock\", \"./s.sock\", \"/dir//x/../s.sock\") are one socket, shared (Node's path.resolve)", function()
      S.path_spellings_share(tmpdir())
    end)

    it("relative unix paths of workers in different directories are different sockets", function()
      local dir = tmpdir()
      local a, b = dir .. "/a", dir .. "/b"
      assert(S.sh("mkdir " .. H.shell_quote(a) .. " " .. H.shell_quote(b)))
      local ws = S.fork(2)
      ws[1]:send({ cmd = "chdir", dir = a })
      ws[2]:send({ cmd = "chdir", dir = b })
      assert(S.take(ws[1], "chdir"))
      assert(S.take(ws[2], "chdir"))
      local rs = S.listen_all(ws, "same", { path = "s.sock" })
      assert.equal("listening", rs[1].ev)
      assert.equal("listening", rs[2].ev)
      assert.is_true(S.exists(a .. "/s.sock"))
      assert.is_true(S.exists(b .. "/s.sock"))
      assert.equal(ws[1].process.pid, answered_by(ask({ path = a .. "/s.sock" })))
      assert.equal(ws[2].process.pid, answered_by(ask({ path = b .. "/s.sock" })))
    end)

    it("closing a worker's relative unix socket, short or too long for sun_path as an absolute path, never unlinks a same-named file in the master's cwd", function()
      local dir = tmpdir()
      local wdir, mdir = dir .. "/worker", dir .. "/master"
      assert(S.sh("mkdir " .. H.shell_quote(wdir) .. " " .. H.shell_quote(mdir)))
      local long = string.rep("L", 100)
      assert.is_true(#(wdir .. "/" .. long) > 107)
      for _, name in ipairs { "decoy.sock", long } do
        local decoy = io.open(mdir .. "/" .. name, "w")
        decoy:write("keep me")
        decoy:close()
      end
      local w = S.fork(1)[1]
      w:send({ cmd = "chdir", dir = wdir })
      assert(S.take(w, "chdir"))
      local here = core.cwd()
      local ok, err = pcall(function()
        core.chdir(mdir)
        for _, name in ipairs { "decoy.sock", long } do
          assert.equal("listening", S.listen(w, name, { path = name }).ev)
          assert.is_true(S.exists(wdir .. "/" .. name))
          S.close(w, name)
        end
        H.run_for(50)
      end)
      core.chdir(here)
      assert(ok, err)
      for _, name in ipairs { "decoy.sock", long } do
        assert.equal("keep me", H.read_file(mdir .. "/" .. name))
        assert.is_false(S.exists(wdir .. "/" .. name))
      end
    end)

    it("a server or dgram socket closed before the master answered its listen never listens: no 'listening' reaches the master and the port is let go", function()
      local w = S.fork(1)[1]
      local heard = {}
      cluster.on("listening", function(_, a) heard[#heard + 1] = a end)
      local port, uport = S.free_port(), S.free_port()
      w:send({ cmd = "listenclose", tag = "t", opts = at(port) })
      w:send({ cmd = "bindclose", tag = "u", port = uport, address = "127.0.0.1" })
      assert(S.take(w, "closed", "t"))
      assert(S.take(w, "closed", "u"))
      -- a later listen on the same worker round-trips to the master after the above
      assert.equal("listening", S.listen(w, "later", at(0)).ev)
      assert.is_true(H.wait_until(function() return #heard == 1 end, 3000))
      H.run_for(20)
      assert.equal(1, #heard)
      assert.is_false(S.has(w, "listening", "t"))
      assert.is_false(S.has(w, "listening", "u"))
      local s = local_server(port, "127.0.0.1")
      assert.equal(port, s:address().port)
      local u = track(dgram.createSocket("udp4"))
      local bound, err = false, nil
      u:on("error", function(e) err = e end)
      u:bind(uport, "127.0.0.1", function() bound = true end)
      assert.is_true(H.wait_until(function() return bound or err ~= nil end, 3000))
      assert.is_nil(err)
    end)

    it("two workers bind the same UDP port through the master; datagrams to it are received and answered", function()
      local ws = S.fork(2)
      local ports = {}
      for i, w in ipairs(ws) do
        w:send({ cmd = "bind", tag = "u", port = 0, address = "127.0.0.1" })
        ports[i] = assert(S.take(w, "bound", "u")).address.port
      end
      assert.equal(ports[1], ports[2])
      local pids = pids_of(ws)
      for _ = 1, 20 do
        local who = S.udp_ask(ports[1])
        assert.is_truthy(who and pids[who], "a datagram was not answered by a worker")
      end
      -- the workers disconnect (closing their sockets) and exit 0; the master lets go of the port
      for _, w in ipairs(ws) do w:send({ cmd = "disconnect" }) end
      for _, w in ipairs(ws) do assert.equal(0, (wait_exit(w))) end
      local again = track(dgram.createSocket("udp4"))
      local bound, err = false, nil
      again:on("error", function(e) err = e end)
      again:bind(ports[1], "127.0.0.1", function() bound = true end)
      assert.is_true(H.wait_until(function() return bound or err ~= nil end, 3000))
      assert.is_nil(err)
    end)

    it("workers send datagrams from sockets of their own (implicitly bound) to a socket the master bound; all arrive", function()
      local got = 0
      local s = track(dgram.createSocket("udp4", function() got = got + 1 end))
      local bound = false
      s:bind(0, "127.0.0.1", function() bound = true end)
      assert.is_true(H.wait_until(function() return bound end, 3000))
      local ws = S.fork(2)
      for _, w in ipairs(ws) do w:send({ cmd = "udpsend", port = s:address().port, address = "127.0.0.1", n = 10 }) end
      for _, w in ipairs(ws) do assert(S.take(w, "sent")) end
      assert.is_true(H.wait_until(function() return got == 20 end, 3000))
    end)

    it("dgram-reuse (Node test-cluster-dgram-reuse): a worker binds two reuseAddr sockets to the same port, closes both and exits 0", function()
      local w = S.fork(1)[1]
      w:send({ cmd = "bind", tag = "a", port = 0, reuseAddr = true })
      local a = assert(S.take(w, "bound", "a"))
      w:send({ cmd = "bind", tag = "b", port = a.address.port, reuseAddr = true })
      local b = assert(S.take(w, "bound", "b"))
      assert.equal(a.address.port, b.address.port)
      w:send({ cmd = "closeudp", tag = "a" })
      w:send({ cmd = "closeudp", tag = "b" })
      assert(S.take(w, "closed", "a"))
      assert(S.take(w, "closed", "b"))
      w:disconnect()
      assert.equal(0, (wait_exit(w)))
    end)
  end)

  describe("round-robin distribution", function()
    it("spreads connections over the workers", function()
      local ws = S.fork(2)
      local port = S.listen_all(ws, "rr", at(0))[1].address.port
      local by, total = S.tally(S.clients(40, at(port), 1))
      assert.equal(40, total)
      for _, w in ipairs(ws) do
        assert.is_true((by[w.process.pid] or 0) >= 10,
          ("worker %d got %d of 40"):format(w.id, by[w.process.pid] or 0))
      end
    end)

    it("a worker that closed its server gets no more connections; the others get them", function()
      local ws = S.fork(2)
      local port = S.listen_all(ws, "rr", at(0))[1].address.port
      S.close(ws[1], "rr")
      local by, total = S.tally(S.clients(20, at(port), 4))
      assert.equal(20, total)
      assert.same({ [ws[2].process.pid] = 20 }, by)
    end)

    it("disconnect-race (Node test-cluster-disconnect-race): worker 1 listens and is disconnected as worker 2 is forked; worker 2, disconnected at 'online', sends its listen(0) meanwhile: both exit 0 and the master keeps no socket", function()
      S.disconnect_race()
    end)

    it("net-server-drop-connection (Node test-cluster-net-server-drop-connection): a worker whose server is at its maxConnections refuses, and the master hands the connection to another: maxConnections 0, 1 and 9 take 0, 1 and 9 of 10", function()
      local dir = tmpdir()
      local path = dir .. "/max.sock"
      local ws = S.fork(3)
      for i, max in ipairs({ 0, 1, 9 }) do
        local r = S.listen(ws[i], "max", { path = path }, nil, "hold", nil, max)
        assert.equal("listening", r.ev)
      end
      -- the clients stay connected, so every worker's count stays where it got to
      local records = {}
      for i = 1, 10 do records[i] = S.client({ path = path }, nil, true) end
      assert.is_true(H.wait_until(function()
        for _, r in ipairs(records) do if not r.data:find("\n") then return false end end
        return true
      end, 8000), "not every connection was answered")
      
      local by, total, failures = S.tally(records)
      assert.same({}, failures)
      assert.equal(10, total)
      assert.same({ [ws[2].process.pid] = 1, [ws[3].process.pid] = 9 }, by)
      -- refused in the worker, not dropped: its server saw no 'drop'
      assert.is_false(S.has(ws[1], "drop", "max"))
      for _, r in ipairs(records) do r.sock:close() end
      assert.is_true(H.wait_until(function()
        for _, r in ipairs(records) do if not r.done then return false end end
        return true
      end, 5000))
      -- with room again (the clients ended), worker 2 takes connections again
      local again = S.tally(S.clients(4, { path = path }, 1))
      assert.is_nil(again[ws[1].process.pid])
      assert.equal(4, (again[ws[2].process.pid] or 0) + (again[ws[3].process.pid] or 0))
    end)

    it("a connection refused by every worker (each at its maxConnections) is closed by the master, and later ones are served once a worker has room", function()
      local ws = S.fork(2)
      local port
      for _, w in ipairs(ws) do
        port = S.listen(w, "full", at(0), nil, "hold", nil, 1).address.port
      end
      local held = { S.client(at(port), nil, true), S.client(at(port), nil, true) }
      assert.is_true(H.wait_until(function() return held[1].data ~= "" and held[2].data ~= "" end, 5000))
      assert.same({ [ws[1].process.pid] = 1, [ws[2].process.pid] = 1 }, (S.tally(held)))
      local refused = S.client(at(port), nil, true)
      assert.is_true(H.wait_until(function() return refused.done end, 5000), "the third connection was left open")
      assert.equal("", refused.data)
      held[1].sock:close()
      assert.is_true(H.wait_until(function() return held[1].done end, 5000))
      H.run_for(50) -- the worker sees the client's end and closes its side
      local later = S.ask(at(port))
      assert.is_truthy(S.answered_by(later))
      held[2].sock:close()
      assert.is_true(H.wait_until(function() return held[2].done end, 5000))
    end)

    it("connections handed to a worker whose server is closing are taken by the others", function()
      local dir = tmpdir()
      local path = dir .. "/drop.sock"
      local ws = S.fork(3)
      S.listen_all(ws, "p", { path = path })
      -- the close races with the connections already on their way to worker 1
      ws[1]:send({ cmd = "close", tag = "p" })
      local by, total, failures = S.tally(S.clients(10, { path = path }))
      assert.same({}, failures)
      assert.equal(10, total)
      assert.is_nil(by[ws[1].process.pid])
    end)

    for _, kind in ipairs { "TCP", "unix" } do
      it(kind .. " connections queued or in flight for a worker killed with SIGKILL under load are handed to another worker: 200 of 200 answered", function()
        local ws = S.fork(2)
        local where = kind == "unix" and { path = tmpdir() .. "/load.sock" } or at(0)
        local address = S.listen_all(ws, "load", where)[1].address
        if kind == "TCP" then where = at(address.port) end
        local victim = ws[1]
        local by = S.clients_killing(victim, 200, where, 20000)
        assert.is_true((by[ws[2].process.pid] or 0) > 0)
        assert.is_true((by[victim.process.pid] or 0) < 200)
        local _, signal = wait_exit(victim)
        assert.equal("SIGKILL", signal)
        -- the survivor keeps serving
        assert.equal(ws[2].process.pid, answered_by(ask(where)))
      end)
    end

    for _, kind in ipairs { "TCP", "unix" } do
      it("a " .. kind .. " connection whose worker read the request and died before answering the master is closed, not handed to another worker that would never see the request", function()
        local ws = S.fork(2)
        local where = kind == "unix" and { path = tmpdir() .. "/die.sock" } or at(0)
        local address = S.listen_all(ws, "die", where, nil, "die")[1].address
        if kind == "TCP" then where = at(address.port) end
        local exits = {}
        for _, w in ipairs(ws) do w:on("exit", function(code) exits[#exits + 1] = code end) end
        -- the worker's answer for this connection is held back (sent in batches), and it
        -- reads the request and exits before sending it (a unix socket keeps no byte
        -- counts: the worker marked it as taken)
        local r = S.client(where, "GET / HTTP/1.1\r\n\r\n", true)
        assert.is_true(H.wait_until(function() return r.done end, 5000), "the client was left waiting")
        assert.equal("", r.data)
        assert.is_true(H.wait_until(function() return #exits == 1 end, 3000))
        assert.same({ 7 }, exits)
        H.run_for(100)
        assert.equal(1, #exits) -- the other worker never got the connection
      end)
    end

    it("connections handed while the channel to a worker is backed up queue behind what it holds and are all answered once it reads again", function()
      local w = S.fork(1)[1]
      local port = S.listen(w, "backed", at(0)).address.port
      S.block(w, 400) -- nothing reads the channel
      -- more than the socket buffer holds, so libuv keeps a queue on the channel and the
      -- hand-offs cannot go out at once in one sendmsg
      w:send(string.rep("x", 4 * 1024 * 1024))
      local by, total, failures = S.tally(S.clients(20, at(port), 20, nil, 8000))
      assert.same({}, failures)
      assert.equal(20, total)
      assert.same({ [w.process.pid] = 20 }, by)
    end)

    it("a worker short of file descriptors survives: descriptors the kernel drops are answered 'not received', and it gets one per message from then on", function()
      local w = S.fork(1)[1]
      local port = S.listen(w, "starved", at(0)).address.port
      local pid = w.process.pid
      local p = S.popen("prlimit --pid " .. pid .. " --nofile -o SOFT --noheadings 2>/dev/null")
      local soft = p:read("a"):match("%d+")
      p:close()
      if not soft then pending("no prlimit(1)") return end
      local used = 0
      local list = S.popen("ls /proc/" .. pid .. "/fd")
      for _ in list:lines() do used = used + 1 end
      list:close()
      -- room for 3 more descriptors: a batch of 20 hand-offs cannot all arrive
      assert(S.sh("prlimit --pid " .. pid .. " --nofile=" .. (used + 3) .. ": >/dev/null 2>&1"))
      local records = S.clients(20, at(port), 20, nil, 10000)
      assert(S.sh("prlimit --pid " .. pid .. " --nofile=" .. soft .. ": >/dev/null 2>&1"))
      local _, total = S.tally(records)
      assert.is_true(total >= 3, "answered " .. total)
      for _, r in ipairs(records) do assert.is_true(r.done) end -- answered or closed: none hangs
      assert.is_false(w:isDead())
      assert.equal(pid, answered_by(ask(at(port))))
    end)

    it("connections handed to a hung worker and unanswered when it is SIGKILLed go to another worker: 200 of 200 answered", function()
      local ws = S.fork(2)
      local port = S.listen_all(ws, "hung", at(0))[1].address.port
      local victim, other = ws[1], ws[2]
      S.block(victim, 5000) -- what it is handed stays unanswered
      local by = S.clients_killing(victim, 200, at(port), 8000)
      assert.same({ [other.process.pid] = 200 }, by)
      local _, signal = wait_exit(victim)
      assert.equal("SIGKILL", signal)
    end)

    for _, case in ipairs(S.leaving_cases()) do it(case.name, function() case.run(tmpdir) end) end

    it("when the last worker leaves a key the master closes that listener: connecting then fails", function()
      local ws = S.fork(2)
      local port = S.listen_all(ws, "k", at(0))[1].address.port
      S.close(ws[1], "k")
      assert.equal(ws[2].process.pid, answered_by(ask(at(port))))
      S.close(ws[2], "k")
      H.run_for(20)
      local r = ask(at(port))
      assert.is_nil(answered_by(r))
      assert.equal("ECONNREFUSED", r.err and r.err.code)
    end)

    it("when the last worker on a key dies the master closes that listener", function()
      local ws = S.fork(2)
      local port = S.listen_all(ws, "k", at(0))[1].address.port
      for _, w in ipairs(ws) do w:kill("SIGKILL") end
      for _, w in ipairs(ws) do wait_exit(w) end
      local r = ask(at(port))
      assert.equal("ECONNREFUSED", r.err and r.err.code)
    end)

    it("server-restart-rr (Node test-cluster-server-restart-rr): a worker closes and listens again on the port it shares with another worker, then both exit 0", function()
      local port = S.free_port()
      local ws = S.fork(2)
      for _, opts in ipairs { at(0), at(port) } do
        local rs = S.listen_all(ws, "s" .. opts.port, opts)
        local shared = rs[1].address.port
        assert.equal(shared, rs[2].address.port)
        S.close(ws[2], "s" .. opts.port)
        local again = S.relisten(ws[2], "s" .. opts.port, opts)
        assert.equal("listening", again.ev, again.message)
        assert.equal(shared, again.address.port)
        local by = S.tally(S.clients(10, at(shared), 1))
        assert.is_true((by[ws[2].process.pid] or 0) > 0)
      end
      ws[2]:disconnect()
      assert.equal(0, (wait_exit(ws[2])))
      ws[1]:disconnect()
      assert.equal(0, (wait_exit(ws[1])))
    end)

    it("a worker that closes and listens again while connections it was handed are still unanswered gets connections again", function()
      local ws = S.fork(2)
      local port = S.listen_all(ws, "again", at(0))[1].address.port
      -- while worker 2's loop is blocked: it is told to close and listen again, and then
      -- handed connections, which it answers only after that (refusing them)
      S.block(ws[2], 300, 40)
      ws[2]:send({ cmd = "close", tag = "again" })
      ws[2]:send({ cmd = "relisten", tag = "again", opts = at(0) })
      local by, total = S.tally(S.clients(10, at(port), 10))
      assert.equal(10, total)
      local r = S.take(ws[2], "listening", "again")
      assert.truthy(r)
      assert.equal(port, r.address.port)
      H.run_for(50)
      by, total = S.tally(S.clients(20, at(port), 1))
      assert.equal(20, total)
      assert.is_true((by[ws[2].process.pid] or 0) > 0, "worker 2 listens again but gets no connections")
    end)

    it("rr-domain-listen (Node test-cluster-rr-domain-listen): a worker killed at its 'listening' exits and its port is released", function()
      local w = S.fork(1)[1]
      local port
      cluster.on("listening", function(cw, a) port = a.port cw:kill() end)
      w:send({ cmd = "listen", tag = "d", opts = at(0) })
      local code, signal = wait_exit(w)
      assert.is_nil(code)
      assert.equal("SIGTERM", signal)
      assert.equal("ECONNREFUSED", ask(at(port)).err.code)
    end)

    it("accept-fail (Node test-cluster-accept-fail; Node closes the connection, ours waits on purpose): while the master cannot accept (EMFILE) the connection waits in the backlog; the master and the worker are untouched, once descriptors are free again it is answered, and the worker then closes, disconnects and exits 0", function()
      local w = S.fork(1)[1]
      local port = S.listen(w, "a", at(0)).address.port
      local r = S.client(at(port))
      -- the client's socket exists; now no descriptor is left for the master's accept
      local restore = S.starve(core.getpid())
      if not restore then pending("no prlimit(1)") return end
      local ok, err = pcall(H.run_for, 300)
      restore()
      assert(ok, err)
      assert.is_nil(r.done) -- neither answered nor reset while descriptors ran out
      assert.is_true(H.wait_until(function() return r.done end, 3000))
      assert.equal(w.process.pid, answered_by(r))
      assert.is_false(w:isDead())
      assert.equal(w.process.pid, answered_by(ask(at(port))))
      S.close(w, "a")
      w:disconnect()
      local code, signal = wait_exit(w)
      assert.equal(0, code)
      assert.is_nil(signal)
    end)
  end)

  describe("sockets", function()
    it("a worker's sockets carry the connection's addresses: IPv4, IPv6, and a dual-stack listener's mapped IPv4 client", function()
      S.check_addresses(S.fork(1)[1])
    end)
  end)

  describe("errors", function()
    it("eaddrinuse (Node test-cluster-eaddrinuse): a listen on a port another server holds fails with EADDRINUSE, syscall bind; the master forgets the key and a retry after the port is freed succeeds", function()
      local hog, port = local_server(0, "127.0.0.1")
      local w = S.fork(1)[1]
      local r = S.listen(w, "e", at(port))
      assert.equal("error", r.ev)
      assert.equal("EADDRINUSE", r.code)
      assert.equal("bind", r.syscall)
      assert.equal("127.0.0.1", r.address)
      assert.equal(port, r.port)
      assert.equal("bind EADDRINUSE 127.0.0.1:" .. port, r.message)
      assert.is_true(math.type(r.errno) == "integer" and r.errno ~= 0)
      assert.is_false(w:isDead())
      S.close_local(hog)
      r = S.listen(w, "e", at(port))
      assert.equal("listening", r.ev, r.message)
      assert.equal(port, r.address.port)
      assert.equal(w.process.pid, answered_by(ask(at(port))))
    end)

    it("a listen with no host on a port held on the IPv6 any-address fails with EADDRINUSE, naming the address the master tried", function()
      local hog, port = local_server(0, HAS_IPV6 and "::" or "0.0.0.0")
      local w = S.fork(1)[1]
      local r = S.listen(w, "e", { port = port })
      assert.equal("error", r.ev)
      assert.equal("EADDRINUSE", r.code)
      assert.equal("bind", r.syscall)
      -- the address the master tried, as a listen of its own would name it
      local any = HAS_IPV6 and "::" or "0.0.0.0"
      assert.equal(any, r.address)
      assert.equal("bind EADDRINUSE " .. any .. ":" .. port, r.message)
      S.close_local(hog)
    end)

    it("a UDP bind on a port another socket holds fails with EADDRINUSE, syscall bind", function()
      local hog = track(dgram.createSocket("udp4"))
      local bound = false
      hog:bind(0, "127.0.0.1", function() bound = true end)
      assert.is_true(H.wait_until(function() return bound end, 3000))
      local w = S.fork(1)[1]
      w:send({ cmd = "bind", tag = "u", port = hog:address().port, address = "127.0.0.1" })
      local r = assert(S.take(w, "error", "u"))
      assert.equal("EADDRINUSE", r.code)
      assert.equal("bind", r.syscall)
    end)

    it("a master whose working directory is gone gives a worker's too-long relative unix path ENOENT instead of raising", function()
      S.master_without_cwd_survives(tmpdir(), { CLUSTER_SCHED_POLICY = "rr" })
    end)

    it("bind-twice (Node test-cluster-bind-twice): a second master's worker gets EADDRINUSE on the port the first master's worker holds, then disconnects and exits 0", function()
      local w = S.fork(1)[1]
      local port = S.listen(w, "one", at(0)).address.port
      local m = H.spawn_master(H.fixture("share_master.lua"), { "listen", tostring(port), "127.0.0.1" })
      assert.is_true(H.wait_until(function() return (H.read_file(m.out) or ""):find("exit") ~= nil end, 5000),
        H.read_file(m.err))
      -- the failed worker disconnects and exits 0, as in Node's test
      assert.equal("error EADDRINUSE bind\nexit 0 nil\n", H.read_file(m.out))
      assert.equal(w.process.pid, answered_by(ask(at(port))))
      H.kill_all()
      H.cleanup_master(m)
    end)

    it("bind-privileged-port (Node test-cluster-bind-privileged-port): without privileges a worker's listen and bind on port 80 get EACCES, syscall bind, and the worker then disconnects and exits 0", function()
      local lines, why = S.unprivileged_masters({ "listen", "bind" }, 80)
      if not lines then pending(why) return end
      assert.same({ "error EACCES bind\nexit 0 nil\n", "error EACCES bind\nexit 0 nil\n" }, lines)
    end)
  end)

  describe("a misbehaving worker", function()
    it("cannot make the master raise or listen with malformed listen requests or handles of the wrong kind", function()
      local ws = S.fork(2)
      local bad, other = ws[1], ws[2]
      local _, port = local_server(0, "127.0.0.1", function(c) track(c) end)
      local cases = {
        { msg = { act = "queryServer", seq = 900, key = "k1", addressType = -1, path = 123 } },
        { msg = { act = "queryServer", seq = 901, key = {}, addressType = 4 } },
        { msg = { act = "queryServer", seq = 902, key = "k3", addressType = 4, address = "127.0.0.1", port = "http" } },
        { msg = { act = "queryServer", seq = 903, key = "k4", addressType = "udp9", port = 0 } },
        { msg = { act = "queryServer", seq = 904, key = "k5", addressType = 4, port = 0, backlog = -1 } },
        { msg = { act = "close", key = {} } },
        { msg = { act = "handle", kind = "net.Socket", msg = "x" }, with = "udp" },
        { msg = { act = "handle", kind = "dgram.Socket", udpType = "bogus", msg = "x" }, with = "udp" },
        { msg = { act = "handle", kind = "net.Server", msg = "x" }, with = "tcp", port = port },
        { msg = { act = "handle", kind = "no.Such", msg = "x" }, with = "udp" },
      }
      local got = {}
      cluster.on("message", function(_, m, handle) got[#got + 1] = { m, handle } end)
      for i, c in ipairs(cases) do
        bad:send({ cmd = "raw", tag = "r" .. i, msg = c.msg, with = c.with, port = c.port })
        assert(S.take(bad, "sent", "r" .. i), "worker gone after case " .. i)
      end
      -- the master is still serving: both workers listen and answer
      local rs = S.listen_all(ws, "after", at(0))
      assert.equal("listening", rs[1].ev)
      assert.equal("listening", rs[2].ev)
      local by, total = S.tally(S.clients(10, at(rs[1].address.port), 1))
      assert.equal(10, total)
      assert.is_true((by[other.process.pid] or 0) > 0)
      -- the handles that did not fit their kind arrived as messages without an object
      local objects = 0
      for _, g in ipairs(got) do if g[2] ~= nil then objects = objects + 1 end end
      assert.equal(0, objects)
    end)
  end)

  describe("handles passed with messages", function()
    it("the master passes accepted sockets to a worker, which answers on them; the master's copy is closed, so the client sees EOF", function()
      local w = S.fork(1)[1]
      local passed = {}
      local _, port = local_server(0, "127.0.0.1", function(c)
        passed[#passed + 1] = c
        w:send({ tag = "s" .. #passed }, c)
      end)
      local a, b = S.client(at(port), nil, true), S.client(at(port), nil, true)
      assert.is_true(H.wait_until(function() return a.done and b.done end, 5000))
      for _, r in ipairs { a, b } do
        assert.equal(w.process.pid .. "\n", r.data)
        assert.is_nil(r.err)
      end
      assert.equal(2, #passed)
      for _, c in ipairs(passed) do assert.is_true(c.destroyed) end
      assert(S.take(w, "got"))
      assert(S.take(w, "got"))
    end)

    it("a socket sent to a worker and back is answered by the master", function()
      local w = S.fork(1)[1]
      w:on("message", function(m, handle)
        if type(m) == "table" and m.ev == "handle" and handle then handle:close("master\n") end
      end)
      local _, port = local_server(0, "127.0.0.1", function(c) w:send({ bounce = true }, c) end)
      local r = S.client(at(port), nil, true)
      assert.is_true(H.wait_until(function() return r.done end, 5000))
      assert.equal("master\n", r.data)
    end)

    it("a worker sends the same socket twice; both arrive and the client is answered and closed", function()
      local w = S.fork(1)[1]
      local got = {}
      w:on("message", function(m, handle)
        if type(m) == "table" and m.ev == "handle" and handle then got[#got + 1] = { m.kind, handle } end
      end)
      local port = S.listen(w, "twice", at(0), nil, "passup2").address.port
      local r = S.client(at(port), nil, true)
      assert.is_true(H.wait_until(function() return #got == 2 end, 5000))
      assert.equal("socket", got[1][1])
      assert.equal("socket2", got[2][1])
      for _, g in ipairs(got) do assert.equal(net.Socket, getmetatable(g[2])) end
      got[1][2]:write("master\n")
      got[1][2]:close()
      got[2][2]:close()
      assert.is_true(H.wait_until(function() return r.done end, 5000))
      assert.equal("master\n", r.data)
      -- the worker is unharmed
      assert.is_false(w:isDead())
      assert.equal(w.process.pid, answered_by(ask(at(S.listen(w, "after", at(0)).address.port))))
    end)

    it("a socket a worker passes on in its 'connection' listener arrives with the bytes the client sent first: the sender reads none of them", function()
      local w = S.fork(1)[1]
      local sock
      w:on("message", function(m, handle)
        if type(m) == "table" and m.ev == "handle" and handle then sock = handle end
      end)
      local port = S.listen(w, "pass", at(0), nil, "passup").address.port
      local r = S.client(at(port), "ping\n", true)
      assert.is_true(H.wait_until(function() return sock ~= nil end, 5000))
      local got = ""
      sock:on("data", function(d) got = got .. d end)
      assert.is_true(H.wait_until(function() return got == "ping\n" end, 3000), "got " .. got)
      sock:close("pong\n")
      assert.is_true(H.wait_until(function() return r.done end, 5000))
      assert.equal("pong\n", r.data)
    end)

    it("a net server passed from a worker to the master and on to another worker keeps serving there", function()
      local ws = S.fork(2)
      local server
      ws[1]:on("message", function(m, handle) if type(m) == "table" and m.ev == "handle" then server = handle end end)
      local port = S.listen(ws[1], "x", { port = 0, host = "127.0.0.1", exclusive = true }).address.port
      ws[1]:send({ cmd = "sendback", tag = "x" })
      assert.is_true(H.wait_until(function() return server ~= nil end, 3000))
      assert.equal(net.Server, getmetatable(server))
      assert.equal(port, server:address().port)
      local sent = false
      ws[2]:send({ tag = "x" }, server, function() sent = true end)
      assert.is_true(H.wait_until(function() return sent end, 3000))
      S.close_local(server)
      local got = assert(S.take(ws[2], "got"))
      assert.equal("server", got.kind)
      assert.equal(port, got.address.port)
      S.close(ws[1], "x")
      local by, total = S.tally(S.clients(5, at(port), 1))
      assert.equal(5, total)
      assert.same({ [ws[2].process.pid] = 5 }, by)
    end)

    it("a worker sending its round-robin server gets an error saying that such a server has no socket to send", function()
      local w = S.fork(1)[1]
      assert.equal("listening", S.listen(w, "rr", at(0)).ev)
      w:send({ cmd = "sendback", tag = "rr" })
      local r = assert(S.take(w, "senderror", "rr"))
      assert.matches("worker:send: bad argument #2 (handle): a server shared by round-robin", r.message, 1, true)
    end)

    it("a dgram socket passed from a worker to the master and on to another worker keeps receiving there", function()
      local ws = S.fork(2)
      local sock
      ws[1]:on("message", function(m, handle) if type(m) == "table" and m.ev == "handle" then sock = handle end end)
      ws[1]:send({ cmd = "bind", tag = "u", port = 0, address = "127.0.0.1", exclusive = true })
      local port = assert(S.take(ws[1], "bound", "u")).address.port
      ws[1]:send({ cmd = "sendback", tag = "u" })
      assert.is_true(H.wait_until(function() return sock ~= nil end, 3000))
      assert.equal(dgram.Socket, getmetatable(sock))
      assert.equal(port, sock:address().port)
      local sent = false
      ws[2]:send({ tag = "u" }, sock, function() sent = true end)
      assert.is_true(H.wait_until(function() return sent end, 3000))
      sock:close()
      local got = assert(S.take(ws[2], "got"))
      assert.equal("udp", got.kind)
      ws[1]:send({ cmd = "closeudp", tag = "u" })
      assert(S.take(ws[1], "closed", "u"))
      for _ = 1, 5 do assert.equal(ws[2].process.pid, S.udp_ask(port)) end
    end)
  end)

  describe("disconnect", function()
    it("worker:disconnect() takes the worker out of distribution at once", function()
      local ws = S.fork(2)
      local port = S.listen_all(ws, "d", at(0), nil, "hold")[1].address.port
      ws[1]:disconnect()
      local by, total = S.tally(S.clients(20, at(port), 20))
      assert.equal(20, total)
      assert.same({ [ws[2].process.pid] = 20 }, by)
      wait_exit(ws[1])
    end)

    it("worker-wait-server-close (Node test-cluster-worker-wait-server-close): an open connection keeps being served and delays the worker's exit; 'disconnect' comes after the server closed", function()
      local log = H.tmpname("log")
      local w = S.fork(1, { SHARE_LOG = log })[1]
      local port = S.listen(w, "e", at(0), nil, "echo").address.port
      local order = {}
      w:on("disconnect", function() order[#order + 1] = "disconnect" end)
      w:on("exit", function(code) order[#order + 1] = "exit " .. tostring(code) end)
      local r = S.client(at(port), "hello\n", true)
      assert.is_true(H.wait_until(function() return r.data == "hello\n" end, 3000))
      w:disconnect()
      -- the only worker left the key: no new connections
      assert.equal("ECONNREFUSED", ask(at(port)).err.code)
      -- the open one is still served, and the worker stays
      r.sock:write("again\n")
      assert.is_true(H.wait_until(function() return r.data == "hello\nagain\n" end, 3000))
      H.run_for(100)
      assert.same({}, order)
      assert.is_true(H.alive(w.process.pid))
      r.sock:close()
      assert.is_true(H.wait_until(function() return #order == 2 end, 5000))
      table.sort(order)
      assert.same({ "disconnect", "exit 0" }, order)
      -- in the worker: the server's 'close' (after its last connection), then 'disconnect'
      assert.equal("close e\ndisconnect\n", H.read_file(log))
      os.remove(log)
    end)

    it("a worker that disconnected and then dies hands what it still held unanswered to another worker", function()
      local ws = S.fork(2)
      local port = S.listen_all(ws, "leave", at(0))[1].address.port
      local victim, other = ws[1], ws[2]
      S.block(victim, 5000) -- what it is handed stays unanswered
      local records = {}
      for i = 1, 6 do records[i] = S.client(at(port)) end
      H.run_for(100)
      victim:disconnect() -- it leaves the rotation, still holding its connections
      H.run_for(50)
      core.kill(victim.process.pid, "SIGKILL")
      assert.is_true(H.wait_until(function()
        for _, r in ipairs(records) do if not r.done then return false end end
        return true
      end, 5000), "connections were left waiting")
      local by, total = S.tally(records)
      assert.equal(6, total)
      assert.same({ [other.process.pid] = 6 }, by)
    end)

    it("worker-no-exit (Node test-cluster-worker-no-exit): a disconnected worker with an open client connection exits only after the connection is destroyed", function()
      local conn
      local _, port = local_server(0, "127.0.0.1", function(c) conn = track(c) end)
      local w = S.fork(1)[1]
      w:send({ cmd = "connect", port = port })
      assert.is_true(H.wait_until(function() return conn ~= nil end, 3000))
      local disconnected, exited = false, false
      w:on("disconnect", function() disconnected = true end)
      w:on("exit", function() exited = true end)
      w:disconnect()
      assert.is_true(H.wait_until(function() return disconnected end, 3000))
      H.run_for(200)
      assert.is_false(exited)
      conn:destroy()
      assert.is_true(H.wait_until(function() return exited end, 3000))
    end)

    it("disconnect (Node test-cluster-disconnect): 4 workers on 2 ports, cluster.disconnect, twice on the same ports, without leaked descriptors", function()
      local ports = { S.free_port(), S.free_port() }
      local me = core.getpid()
      local fds_before = S.settled_fd_count(me)
      for round = 1, 2 do
        local ws = S.fork(4)
        for i, port in ipairs(ports) do
          for _, w in ipairs(ws) do
            local r = S.listen(w, "p" .. i, at(port))
            assert.equal("listening", r.ev, r.message)
          end
        end
        local pids = pids_of(ws)
        for _, port in ipairs(ports) do
          local r = ask(at(port))
          assert.is_truthy(pids[answered_by(r)])
        end
        local done = false
        cluster.disconnect(function() done = true end)
        assert.is_true(H.wait_until(function() return done end, 5000), "cluster.disconnect callback never ran")
        for _, w in ipairs(ws) do if not w:isDead() then wait_exit(w) end end
        for _, port in ipairs(ports) do assert.equal("ECONNREFUSED", ask(at(port)).err.code) end
        local now
        assert.is_true(H.wait_until(function() now = S.fd_count(me) return now == fds_before end, 2000, 20),
          ("round %d: master fds %d before, %d after"):format(round, fds_before, now))
      end
    end)
  end)

  it("leaks nothing: after 2000 connections through round-robin, the master's and workers' descriptor counts return to where they were", function()
    local ws = S.fork(2)
    local port = S.listen_all(ws, "leak", at(0))[1].address.port
    S.clients(10, at(port), 2)
    local me = core.getpid()
    local before = { S.settled_fd_count(me), S.settled_fd_count(ws[1].process.pid), S.settled_fd_count(ws[2].process.pid) }
    local by, total = S.tally(S.clients(2000, at(port), 50, nil, 60000))
    assert.equal(2000, total)
    assert.is_true((by[ws[1].process.pid] or 0) > 0 and (by[ws[2].process.pid] or 0) > 0)
    local now
    local same = H.wait_until(function()
      collectgarbage()
      now = { S.fd_count(me), S.fd_count(ws[1].process.pid), S.fd_count(ws[2].process.pid) }
      return now[1] == before[1] and now[2] == before[2] and now[3] == before[3]
    end, 3000, 50)
    assert.is_true(same, ("fds before %s, after %s"):format(table.concat(before, "/"), table.concat(now, "/")))
  end)
end)
