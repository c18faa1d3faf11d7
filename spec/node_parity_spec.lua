-- Parity with Node's own cluster tests (test/parallel/test-cluster-*.js): the ones no
-- other spec file ports, each named in its `it`. Real processes and sockets on loopback.
-- Workers: spec/fixtures/parity_worker.lua (PARITY_MODE), worker.lua, spin.lua and
-- share_worker.lua (through fixtures/share_lib); masters of their own (a scheduling
-- policy of their own, settings nothing has touched): spec/fixtures/parity_master.lua.
-- The Node tests this suite does not port, and why, are listed at the end of this file.
local cluster = require "cluster"
local net = require "cluster.net"
local core = require "cluster.core"
local H = require "helper"
local S = require "fixtures.share_lib"

local PARITY_WORKER = H.fixture("parity_worker.lua")
local PARITY_MASTER = H.fixture("parity_master.lua")
local HAS_IPV6 = S.has_ipv6()
local at, ask, answered_by, pids_of = S.at, S.ask, S.answered_by, S.pids_of
-- generous: the suite also runs under ASan+UBSan on a loaded machine
local WAIT = 15000

-- Forks a parity_worker.lua in `mode` (more environment in env); S.wait_exit(w) gives
-- its code and signal.
local function fork(mode, env)
  env = env or {}
  env.PARITY_MODE = mode
  return S.fork_script(PARITY_WORKER, 1, env)[1]
end

-- Waits for w's exit and asserts code 0, no signal.
local function exits_cleanly(w)
  local code, signal = S.wait_exit(w, WAIT)
  assert.equal(0, code, "signal " .. tostring(signal))
  assert.is_nil(signal)
end

local before, after, tmpdir = S.scaffold()

describe("Node parity", function()
  before_each(before)
  after_each(after)

  describe("lifecycle", function()
    it("call-and-destroy (Node test-cluster-call-and-destroy): a worker that disconnects itself is not connected at its 'disconnect', where destroy() may still be called", function()
      cluster.setupMaster { exec = H.fixture("worker.lua") }
      local w = cluster.fork({ FIXTURE_MODE = "disconnect" })
      local connected_at, exited
      w:on("disconnect", H.expect(function()
        connected_at = w:isConnected()
        w:destroy()
      end))
      w:on("exit", H.expect(function() exited = true end))
      assert.is_true(H.wait_until(function() return exited end, WAIT))
      assert.is_false(connected_at)
      assert.is_true(w.exitedAfterDisconnect)
      assert.is_true(w:isDead())
      H.finish()
    end)

    -- Node's workers all get the command of the worker that came online last; here
    -- also every other worker the other one
    for _, pattern in ipairs { "disconnect", "kill", "alternate" } do
      it("concurrent-disconnect (Node test-cluster-concurrent-disconnect): workers told at once to " .. pattern .. " themselves, and told again to disconnect at every 'disconnect', all exit 0", function()
        cluster.setupMaster { exec = H.fixture("worker.lua") }
        local n = math.min(math.max(cluster.cpus(), 4), 8)
        local ws, online, exits, bad_errors = {}, 0, {}, {}
        -- sends that meet a closing channel may fail (Node allows EPIPE and ECONNRESET)
        local expected = { EPIPE = true, ECONNRESET = true, ECANCELED = true, ERR_IPC_CHANNEL_CLOSED = true }
        local function command(j)
          if pattern == "alternate" then return j % 2 == 1 and "disconnect" or "kill" end
          return pattern
        end
        for i = 1, n do
          local w = cluster.fork()
          ws[i] = w
          w:on("error", function(e)
            if not (type(e) == "table" and expected[e.code]) then bad_errors[#bad_errors + 1] = tostring(e) end
          end)
          w:once("online", function()
            online = online + 1
            if online < n then return end
            for j, v in ipairs(ws) do
              if v:isConnected() then v:send({ cmd = command(j) }) end
            end
          end)
          w:once("disconnect", function()
            for _, v in ipairs(ws) do
              if v:isConnected() then v:send({ cmd = "disconnect" }) end
            end
          end)
          w:once("exit", function(code, signal) exits[#exits + 1] = { id = w.id, code = code, signal = signal } end)
        end
        assert.is_true(H.wait_until(function() return #exits == n end, WAIT), #exits .. " of " .. n .. " workers exited")
        for _, e in ipairs(exits) do
          assert.equal(0, e.code, ("worker %d: code %s, signal %s"):format(e.id, tostring(e.code), tostring(e.signal)))
          assert.is_nil(e.signal)
        end
        assert.same({}, bad_errors)
        H.finish()
      end)
    end

    it("disconnect-before-exit (Node test-cluster-disconnect-before-exit): cluster.disconnect() at the 'disconnect' of a worker disconnected at 'online' leaves it alone; it exits 0", function()
      cluster.setupMaster { exec = H.fixture("worker.lua") }
      local w = cluster.fork()
      local called, exit_code = false, nil
      w:on("online", H.expect(function() w:disconnect() end))
      w:on("disconnect", H.expect(function()
        cluster.disconnect(H.expect(function() called = true end))
      end))
      w:on("exit", H.expect(function(code) exit_code = code end))
      assert.is_true(H.wait_until(function() return called and exit_code ~= nil end, WAIT))
      assert.equal(0, exit_code)
      H.finish()
    end)

    it("disconnect-idle-worker (Node test-cluster-disconnect-idle-worker): cluster.disconnect(cb) right after two forks (fork called as a plain function); in cb no worker is left", function()
      cluster.setupMaster { exec = H.fixture("worker.lua") }
      local fork_fn = cluster.fork
      local a, b = fork_fn(), fork_fn()
      local left
      cluster.disconnect(H.expect(function() left = next(cluster.workers) end))
      local exits = 0
      for _, w in ipairs { a, b } do
        w:on("exit", function(code)
          assert.equal(0, code)
          exits = exits + 1
        end)
      end
      assert.is_true(H.wait_until(function() return exits == 2 end, WAIT))
      H.run_for(20)
      assert.is_nil(left)
      assert.is_true(a.exitedAfterDisconnect and b.exitedAfterDisconnect)
      H.finish()
    end)

    it("kill-infinite-loop (Node test-cluster-kill-infinite-loop): worker.process:kill() ends a worker stuck in `while true do end` with SIGTERM", function()
      cluster.setupMaster { exec = H.fixture("spin.lua") }
      local w = cluster.fork()
      local code, signal, exited = nil, nil, false
      w:on("online", H.expect(function() w.process:kill() end))
      w:on("exit", H.expect(function(c, s) code, signal, exited = c, s, true end))
      assert.is_true(H.wait_until(function() return exited end, WAIT))
      assert.is_nil(code)
      assert.equal("SIGTERM", signal)
      assert.is_false(w.exitedAfterDisconnect)
      H.finish()
    end)

    it("ipc-throw (Node test-cluster-ipc-throw): a worker's server 'error' listener that calls disconnect() and raises: the error reaches the worker's run(), and once it runs the loop again the disconnect completes and it exits 0", function()
      local server, port = S.local_server(0, HAS_IPV6 and "::" or "0.0.0.0")
      local w = fork("ipc_throw", { PARITY_PORT = tostring(port) })
      exits_cleanly(w)
      -- the master's own server is untouched
      assert.is_true(server.listening)
      assert.equal(port, server:address().port)
    end)

    it("process-disconnect (Node test-cluster-process-disconnect): a worker that disconnects itself once its server listens exits 0, no signal", function()
      local w = S.fork(1)[1]
      local r = S.listen(w, "p", nil, { 0 })
      assert.equal("listening", r.ev, r.message)
      w:send({ cmd = "disconnect" })
      exits_cleanly(w)
      assert.is_true(w.exitedAfterDisconnect)
    end)
  end)

  describe("sharing", function()
    it("child-index-net (Node test-cluster-child-index-net): two servers listen(0), each closes once listening while a new server listens(0) at once; all four listen and close, and the worker exits 0", function()
      local listening = 0
      cluster.on("listening", function() listening = listening + 1 end)
      exits_cleanly(fork("child_index_net"))
      assert.equal(4, listening)
      assert.equal(0, cluster._sharedHandleCount())
    end)

    it("child-index-dgram (Node test-cluster-child-index-dgram): the same with udp4 sockets bind(0), closed on the next turn; the worker exits 0", function()
      local listening = 0
      cluster.on("listening", function() listening = listening + 1 end)
      exits_cleanly(fork("child_index_dgram"))
      assert.equal(4, listening)
      assert.equal(0, cluster._sharedHandleCount())
    end)

    it("dgram-ipv6only (Node test-cluster-dgram-ipv6only): a worker's udp6 ipv6Only bind on :: and its udp4 bind on 0.0.0.0, same port, both succeed; it closes both, disconnects and exits 0", function()
      if not HAS_IPV6 then pending("no IPv6 on this host") return end
      local heard = {}
      cluster.on("listening", function(_, a) heard[#heard + 1] = a end)
      exits_cleanly(fork("dgram_ipv6only"))
      assert.equal(2, #heard)
      assert.same({ "udp6", "udp4" }, { heard[1].addressType, heard[2].addressType })
      assert.equal(heard[1].port, heard[2].port)
    end)

    it("eaccess (Node test-cluster-eaccess): a worker's listen on a unix path another server holds gets EADDRINUSE, which it sends to the master; it disconnects and exits 0", function()
      local path = tmpdir() .. "/pipe.sock"
      local holder = S.track(net.createServer(function(c) c:destroy() end))
      local held = false
      holder:listen(path, function() held = true end)
      assert.is_true(H.wait_until(function() return held end, WAIT))
      cluster.on("fork", H.expect())
      local w = fork("eaccess", { PARITY_PATH = path })
      w:on("online", H.expect())
      local got
      w:on("message", H.expect(function(m)
        w:disconnect() -- first, so that no worker is left behind
        got = m
      end))
      assert.is_true(H.wait_until(function() return got ~= nil end, WAIT))
      assert.equal("table", type(got), tostring(got))
      assert.equal("EADDRINUSE", got.code)
      assert.equal("bind", got.syscall)
      assert.equal(path, got.path)
      assert.equal("string", type(got.message))
      exits_cleanly(w)
      assert.is_true(holder.listening)
      H.finish()
    end)

    it("disconnect-handles (Node test-cluster-disconnect-handles, without its debugger): worker:disconnect() of the only worker on a port lets the master's socket go at once; a connection already handed to the (blocked) worker is still answered", function()
      local w = S.fork(1)[1]
      local port = S.listen(w, "h", at(0)).address.port
      S.block(w, 500)
      local r = S.client(at(port))
      assert.is_true(H.wait_until(function() return cluster._handedTo(w) == 1 end, WAIT), "the master never handed the connection")
      assert.equal(1, cluster._sharedHandleCount())
      w:disconnect()
      assert.equal(0, cluster._sharedHandleCount())
      assert.equal("ECONNREFUSED", ask(at(port)).err.code)
      assert.is_true(H.wait_until(function() return r.done end, WAIT))
      assert.equal(w.process.pid, answered_by(r))
      exits_cleanly(w)
    end)

    it("worker-handle-close (Node test-cluster-worker-handle-close): a connection handed to the only worker after its server closed is dropped, not served; the worker goes on and exits 0 when disconnected", function()
      local w = S.fork(1)[1]
      local port = S.listen(w, "c", at(0)).address.port
      S.block(w, 1000)
      -- the worker reads this after its block, before the hand-off of the connection
      -- the master accepts meanwhile: the server is closed when the connection comes
      w:send({ cmd = "close", tag = "c" })
      local r = S.client(at(port))
      assert.is_true(H.wait_until(function() return r.done end, WAIT))
      assert.is_true(r.connected)
      assert.equal("", r.data)
      assert.equal(0, cluster._handedTo(w))
      assert(S.take(w, "closed", "c"))
      assert.equal(0, cluster._sharedHandleCount())
      w:disconnect()
      exits_cleanly(w)
    end)

    it("http-pipe (Node test-cluster-http-pipe, without HTTP): a worker serves on a unix path through the master; the server's socket has no remote or local address", function()
      local path = tmpdir() .. "/http.sock"
      local w = S.fork(1)[1]
      local r = S.listen(w, "p", { path = path }, nil, "addr")
      assert.equal("listening", r.ev, r.message)
      local answer = ask({ path = path })
      assert.is_nil(answer.err)
      assert.equal("nil nil nil nil nil nil\n", answer.data)
      w:disconnect()
      exits_cleanly(w)
    end)

    it("net-listen-ipv6only-false (Node test-cluster-net-listen-ipv6only-false): three workers listen(0) on :: without ipv6Only share one dual-stack port; an IPv4 client is served", function()
      if not HAS_IPV6 then pending("no IPv6 on this host") return end
      local ws = S.fork(3)
      local heard = {}
      cluster.on("listening", function(w, a) heard[w.id] = a end)
      local rs = S.listen_all(ws, "d", { port = 0, host = "::" })
      assert.is_true(H.wait_until(function()
        for _, w in ipairs(ws) do if not heard[w.id] then return false end end
        return true
      end, WAIT))
      local first = heard[ws[1].id]
      for i, w in ipairs(ws) do
        assert.equal("listening", rs[i].ev, rs[i].message)
        assert.same(first, heard[w.id])
      end
      assert.equal(6, first.addressType)
      local pids = pids_of(ws)
      assert.is_truthy(pids[answered_by(ask(at(first.port, "0.0.0.0")))])
      for _, w in ipairs(ws) do w:disconnect() end
      for _, w in ipairs(ws) do exits_cleanly(w) end
    end)

    it("message (Node test-cluster-message, its TCP part): the port of the worker's 'listening' reaches its server; messages both ways interleave with the connection: the worker answers on it what the master sent, the master gets the worker's message on the worker and on cluster", function()
      local w = fork("message")
      local checks, ended, client = {}, false, nil
      local function check(kind, value)
        checks[kind] = value
        if checks.master and checks.global and checks.worker then client:close() end
      end
      w:on("message", function(m) check("master", m) end)
      cluster.on("message", function(from, m)
        assert.equal(w, from)
        check("global", m)
      end)
      w:on("listening", H.expect(function(address)
        client = net.connect(address.port, function() w:send("message from master") end)
        client:on("data", function(d) check("worker", d) end)
        client:on("end", function()
          ended = true
          w:kill()
        end)
      end))
      assert.is_true(H.wait_until(function() return ended end, WAIT), "the connection never ended")
      assert.same({ master = "message from worker", global = "message from worker",
                    worker = "received message:message from master" }, checks)
      S.wait_exit(w, WAIT)
      H.finish()
    end)

    it("net-send (Node test-cluster-net-send): a worker sends the master its client socket, connected to the worker's own server; the master reads what the server then writes, and the end", function()
      local w = fork("net_send")
      local data, ended, got = "", false, nil
      w:on("message", function(m, handle)
        if m ~= "handle" then return end
        got = handle
        handle:on("data", function(d) data = data .. d end)
        handle:on("end", function()
          ended = true
          w:kill()
        end)
        w:send("got")
      end)
      assert.is_true(H.wait_until(function() return ended end, WAIT), "no 'end' on the socket the worker sent")
      assert.equal(net.Socket, getmetatable(got))
      assert.equal("hello", data)
      S.wait_exit(w, WAIT)
    end)

    it("rr-handle-close (Node test-cluster-rr-handle-close): a worker whose round-robin server closes once listening has nothing left and exits 0", function()
      exits_cleanly(fork("rr_close"))
      assert.equal(0, cluster._sharedHandleCount())
    end)

    it("rr-handle-ref-unref (Node test-cluster-rr-handle-ref-unref): a round-robin server unref()'d before it listens, then ref()'d and unref()'d once listening, lets its worker exit 0", function()
      exits_cleanly(fork("rr_ref_unref"))
    end)

    it("rr-ref (Node test-cluster-rr-ref): a round-robin server unref()'d and ref()'d again closes with its callback", function()
      local w = fork("rr_ref")
      local done = false
      w:on("message", function(m)
        if m == "done" then
          done = true
          w:kill()
        end
      end)
      assert.is_true(H.wait_until(function() return done end, WAIT), "the close callback never ran")
      S.wait_exit(w, WAIT)
    end)
  end)

  describe("settings", function()
    it("setup-primary-emit (Node test-cluster-setup-primary-emit): 'setup' gets the settings: exec as given (made absolute), and exec again after a setupMaster() with no argument", function()
      local seen = {}
      cluster.once("setup", H.expect(function(settings) seen[1] = settings.exec end))
      cluster.setupMaster({ exec = "new-exec" })
      assert.is_true(H.wait_until(function() return seen[1] ~= nil end, WAIT))
      assert.equal(core.cwd() .. "/new-exec", seen[1])
      cluster.once("setup", H.expect(function(settings) seen[2] = settings.exec end))
      cluster.setupMaster()
      assert.is_true(H.wait_until(function() return seen[2] ~= nil end, WAIT))
      assert.equal(seen[1], seen[2])
      H.finish()
    end)

    it("setup-primary-argv (Node test-cluster-setup-primary-argv): settings.args defaults to the script's arguments as they are when setupMaster is first called", function()
      local m = H.spawn_master(PARITY_MASTER, { "setup_argv" })
      assert.is_true(H.wait_until(function() return H.master_status(m) ~= nil end, WAIT), "the master did not end")
      local out, err, status = H.read_file(m.out), H.read_file(m.err), H.master_status(m)
      H.cleanup_master(m)
      assert.equal(0, status, err)
      assert.equal("setup OMG,OMG 3\n", out)
    end)
  end)

  -- Runs parity_master.lua with policy (CLUSTER_SCHED_POLICY) until it ends on its own;
  -- returns what it printed (lines) once it exited 0.
  local function run_master(policy, args)
    local m = H.spawn_master(PARITY_MASTER, args, { CLUSTER_SCHED_POLICY = policy })
    assert.is_true(H.wait_until(function() return H.master_status(m) ~= nil end, WAIT),
      "the master did not end: a worker or a socket held it")
    local out, err, status = H.read_file(m.out), H.read_file(m.err), H.master_status(m)
    H.cleanup_master(m)
    assert.equal(0, status, err)
    assert.equal("", err)
    local lines = {}
    for line in out:gmatch("[^\n]+") do lines[#lines + 1] = line end
    return lines
  end

  for _, policy in ipairs { "none", "rr" } do
    describe("a master of its own, policy " .. policy, function()
      it("disconnect-leak (Node test-cluster-disconnect-leak): cluster.disconnect() right after forking a worker that listens: the worker's 'disconnect' and 'exit' and the cluster's 'exit' fire, and the master ends", function()
        assert.same({ "worker disconnect", "exit worker 0 nil", "cluster exit true" }, run_master(policy, { "disconnect_leak" }))
      end)

      for _, kind in ipairs { "tcp", "udp" } do
        it("disconnect-unshared-" .. kind .. " (Node test-cluster-disconnect-unshared-" .. kind .. "): an idle worker disconnected once another is bound, then cluster.disconnect() at its 'disconnect': both exit 0 and the master ends", function()
          local lines = run_master(policy, { "disconnect_unshared", kind })
          table.sort(lines)
          assert.same({ "exit bound 0 nil", "exit unbound 0 nil" }, lines)
        end)
      end

      it("shared-leak (Node test-cluster-shared-leak): two workers on one port, a client connected, both disconnected: both exit 0, and the master ends once the client is destroyed", function()
        local lines = run_master(policy, { "shared_leak" })
        assert.equal("connected", lines[1])
        local exits = { lines[2], lines[3] }
        table.sort(exits)
        assert.same({ "exit worker1 0 nil", "exit worker2 0 nil" }, exits)
        assert.equal(3, #lines)
      end)
    end)
  end
end)

-- Node's cluster tests ported elsewhere: see the other spec files (grep for
-- "test-cluster-"). Node's tests not ported, because our API has no counterpart:
--   advanced-serialization   the `serialization` setting (messages are Lua values; cycles raise)
--   dgram-bind-fd            dgram bind({fd=}): no descriptor-number option in cluster.dgram
--   fork-stdio               the `stdio` setting (only `silent`)
--   fork-windowsHide         Windows only
--   listen-pipe-readable-writable  listen{readableAll=, writableAll=}: no such options
--   send-socket-to-worker-http-server  socket.server under Node's http module
--   uncaught-exception       process 'uncaughtException': Lua has no such hook to override
--   worker-constructor       cluster.Worker is not exported: Workers come from fork()
--   debug-port (old name)    the debugger's port setting
