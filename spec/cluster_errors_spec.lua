-- Bad input and broken workers: misuse raises an error naming the function and the
-- argument; a worker that cannot start or that breaks the channel gives an 'error' on
-- that worker and the master goes on.
local cluster = require "cluster"
local H = require "helper"

-- The message of the error fn(...) raises (fails the spec when it does not raise).
local function raised(fn, ...)
  local ok, err = pcall(fn, ...)
  assert(not ok, "expected an error")
  return tostring(err)
end

local function has(s, ...)
  for _, needle in ipairs { ... } do
    assert(s:find(needle, 1, true), string.format("%q not found in error %q", needle, s))
  end
end

describe("cluster errors", function()
  before_each(function()
    H.setup()
    cluster.setupMaster { exec = H.fixture("worker.lua"), execPath = require("cluster.core").exepath() }
  end)
  after_each(H.teardown)

  it("raises when a worker calls fork(), saying only the master forks", function()
    local w = cluster.fork()
    local reply
    w:on("message", function(m) reply = m; w:kill() end)
    w:send({ cmd = "fork" })
    assert.is_true(H.wait_until(function() return reply ~= nil end, 5000))
    assert.is_false(reply.ok)
    has(reply.err, "fork", "worker")
    H.finish()
  end)

  it("fork(env) with a wrong type raises naming fork and env", function()
    has(raised(cluster.fork, 42), "fork", "env", "number")
    has(raised(cluster.fork, "FOO=bar"), "fork", "env", "string")
    has(raised(cluster.fork, { "positional" }), "fork", "env", "keys")
    has(raised(cluster.fork, { FOO = print }), "fork", "env.FOO", "function")
    has(raised(cluster.fork, { FOO = {} }), "fork", "env.FOO", "table")
    has(raised(cluster.fork, { ["A=B"] = "x" }), "fork", "env", "A=B")
    has(raised(cluster.fork, { [""] = "x" }), "fork", "env")
    has(raised(cluster.fork, { FOO = "a\0b" }), "fork", "env.FOO", "zero byte")
    assert.is_nil(next(cluster.workers))
    H.finish()
  end)

  it("setupMaster with a wrong type raises naming setupMaster and the setting", function()
    has(raised(cluster.setupMaster, { exec = 1 }), "setupMaster", "exec", "string", "number")
    has(raised(cluster.setupMaster, 5), "setupMaster", "settings", "table")
    has(raised(cluster.setupMaster, { args = "a b" }), "setupMaster", "args", "table")
    has(raised(cluster.setupMaster, { args = { {} } }), "setupMaster", "args", "item 1")
    has(raised(cluster.setupMaster, { silent = "yes" }), "setupMaster", "silent", "boolean")
    has(raised(cluster.setupMaster, { uid = 1.5 }), "setupMaster", "uid", "integer")
    has(raised(cluster.setupPrimary, { cwd = false }), "setupPrimary", "cwd")
    -- a rejected call changes nothing
    assert.equal(H.fixture("worker.lua"), cluster.settings.exec)
    H.finish()
  end)

  it("worker:send(function) raises at the call, naming the function and the argument `message`", function()
    local w = cluster.fork()
    has(raised(w.send, w, function() end), "send", "message", "function")
    has(raised(w.send, w, coroutine.create(print)), "send", "message", "thread")
    w:kill()
    H.finish()
  end)

  it("worker:send of a table holding what cannot travel raises at the call, naming the path", function()
    local w = cluster.fork()
    has(raised(w.send, w, { f = print }), "send", "message.f", "function")
    has(raised(w.send, w, { list = { 1, 2, { co = coroutine.create(print) } } }), "message.list[3].co", "thread")
    has(raised(w.send, w, { out = io.stdout }), "message.out", "userdata")
    local cycle = { name = "loop" }
    cycle.self = cycle
    has(raised(w.send, w, cycle), "message.self", "cycle")
    local deep = { a = {} }
    deep.a.back = deep
    has(raised(w.send, w, deep), "message.a.back", "cycle")
    has(raised(w.send, w, "x", nil, 42), "send", "callback")
    has(raised(w.send, w, "x", "not a handle"), "send", "handle")
    has(raised(w.send, w, "x", {}, function() end), "send", "handle")
    has(raised(w.send, w, "x", io.stdout), "send", "handle")
    -- the channel still works after the refused sends
    local echoed
    w:on("message", function(m) echoed = m; w:kill() end)
    w:send("still fine")
    assert.is_true(H.wait_until(function() return echoed ~= nil end, 5000))
    assert.equal("still fine", echoed)
    H.finish()
  end)

  it("worker:kill, cluster.disconnect and event methods raise on wrong argument types", function()
    local w = cluster.fork()
    has(raised(w.kill, w, "SIGNOPE"), "kill", "signal")
    has(raised(w.kill, w, {}), "kill", "signal")
    has(raised(cluster.disconnect, 5), "disconnect", "callback")
    has(raised(cluster.on, 1, print), "on", "event name")
    has(raised(cluster.on, "exit", "nope"), "on", "listener")
    has(raised(w.on, w, "exit", 1), "on", "listener")
    w:kill()
    H.finish()
  end)

  it("misuse is reported at the caller's line, naming the function and the argument, in every module", function()
    local net, dgram = require "cluster.net", require "cluster.dgram"
    local here = debug.getinfo(1, "S").short_src
    -- the error a Lua caller's fn() raises: positioned at this file, with the needles
    local function at_caller(fn, ...)
      local ok, err = pcall(fn)
      assert(not ok, "expected an error")
      err = tostring(err)
      assert(err:sub(1, #here + 1) == here .. ":", string.format("%q is not positioned at %s", err, here))
      has(err, ...)
    end
    local w = cluster.fork()
    local server, udp = net.createServer(), dgram.createSocket("udp4")
    at_caller(function() cluster.fork(42) end, "fork", "env")
    at_caller(function() cluster.setupMaster { exec = 1 } end, "setupMaster", "exec")
    at_caller(function() w:kill("SIGNOPE") end, "worker:kill: bad argument #1 (signal)", "SIGNOPE")
    at_caller(function() w:send(print) end, "send", "message")
    at_caller(function() cluster.on(1, print) end, "on", "event name")
    at_caller(function() cluster.setTimeout("soon", 10) end, "setTimeout", "callback")
    at_caller(function() net.createServer(5) end, "net.createServer", "#1")
    at_caller(function() server:listen(true) end, "server:listen: bad argument #1 (port)", "boolean")
    at_caller(function() server:listen(-1) end, "server:listen: bad argument #1 (port)", "-1")
    at_caller(function() server:listen { port = "x" } end, "server:listen: bad argument #1 (port)")
    at_caller(function() server:listen {} end, "server:listen: bad argument #1 (options)", "port", "path")
    at_caller(function() server:listen { host = "127.0.0.1" } end, "server:listen: bad argument #1 (options)")
    at_caller(function() net.connect() end, "net.connect: bad argument #1 (port)")
    at_caller(function() net.connect(1, 2) end, "net.connect: bad argument #2 (host)")
    at_caller(function() dgram.createSocket("udp5") end, "dgram.createSocket: bad argument #1 (type)", "udp5")
    at_caller(function() udp:bind("x") end, "bind", "port")
    at_caller(function() udp:send(5, 1) end, "send", "msg")
    at_caller(function() udp:address() end, "socket:address", "not bound")
    udp:close()
    at_caller(function() udp:close() end, "socket:close", "not running")
    -- nothing was left listening or registered by the refused calls
    assert.is_false(server.listening)
    w:kill()
    H.finish()
  end)

  it("misuse is reported at the caller's line also when the modules are not loaded from files (a bundle, package.preload)", function()
    local script = H.tmpfile("bundle.lua")
    local f = assert(io.open(script, "w"))
    f:write(string.format([[
      for _, m in ipairs { "errors", "loop", "emitter" } do
        local src = assert(io.open(%q .. m .. ".lua")):read("a")
        package.preload["cluster." .. m] = function() return assert(load(src, "=cluster/" .. m .. ".lua"))() end
      end
      local loop = require "cluster.loop"
      local ok, err = pcall(function()
        loop.setTimeout("not a function", 10) -- line 7
      end)
      io.write(tostring(err))
    ]], H.ROOT .. "/lua/cluster/"))
    f:close()
    local p = io.popen("lua5.4 " .. H.shell_quote(script) .. " 2>&1")
    local out = p:read("a")
    p:close()
    assert.truthy(out:find("bundle.lua:7: setTimeout: bad argument #1", 1, true), out)
    H.finish()
  end)

  it("a worker script that does not exist gives an 'error' that says why and an 'exit', and the master goes on", function()
    local good = cluster.fork()
    cluster.setupMaster({ exec = "/nonexistent/worker.lua" })
    local bad = cluster.fork()
    cluster.setupMaster({ exec = H.fixture("worker.lua") })
    local err, code
    bad:on("error", H.expect(function(e) err = e end))
    bad:on("exit", H.expect(function(c) code = c end))
    bad:on("online", H.expect(nil, 0))
    cluster.on("fork", H.expect(nil, 2))
    assert.is_true(H.wait_until(function() return code ~= nil end, 5000))
    assert.equal("ENOENT", err.code)
    has(tostring(err), "/nonexistent/worker.lua", "No such file")
    assert.is_true(code ~= 0)
    assert.is_true(bad:isDead())
    assert.is_nil(cluster.workers[bad.id])
    -- the other worker is fine
    local echoed
    good:on("message", function(m) echoed = m; good:kill() end)
    good:send("hello")
    assert.is_true(H.wait_until(function() return echoed ~= nil end, 5000))
    assert.equal("hello", echoed)
    H.finish()
  end)

  it("an execPath that does not exist gives 'error' ENOENT and 'exit', and kill/send on that worker do not raise", function()
    cluster.setupMaster({ execPath = "/nonexistent/lua5.4" })
    local w = cluster.fork()
    cluster.setupMaster({ execPath = require("cluster.core").exepath() })
    local err, exited, send_err
    w:on("error", H.expect(function(e) err = e end))
    w:on("exit", H.expect(function(c, s) exited = { c, s } end))
    assert.is_nil(w.process.pid)
    w:kill()
    w:kill("SIGKILL")
    w.process:kill()
    w:send("lost", function(e) send_err = e end)
    assert.is_true(H.wait_until(function() return exited ~= nil and send_err ~= nil end, 5000))
    assert.equal("ENOENT", err.code)
    assert.equal("spawn", err.syscall)
    has(tostring(err), "/nonexistent/lua5.4")
    assert.equal("number", type(exited[1]))
    assert.is_nil(exited[2])
    assert.is_true(w:isDead())
    assert.is_false(w:isConnected())
    assert.is_not_nil(send_err)
    H.finish()
  end)

  it("a cwd that cannot be used gives an 'error' that names that directory, not the interpreter", function()
    local core = require "cluster.core"
    local file = H.tmpname("not-a-dir")
    assert(io.open(file, "w")):close()
    local errs = {}
    for _, cwd in ipairs { "/nonexistent/dir", file } do
      cluster.setupMaster({ cwd = cwd })
      local w = cluster.fork()
      w:on("error", function(e) errs[cwd] = e end)
    end
    cluster.setupMaster({ cwd = core.cwd() })
    assert.is_true(H.wait_until(function() return errs[file] ~= nil and errs["/nonexistent/dir"] ~= nil end, 5000))
    local e = errs["/nonexistent/dir"]
    assert.equal("ENOENT", e.code)
    assert.equal("spawn", e.syscall)
    assert.equal("/nonexistent/dir", e.path)
    has(tostring(e), "/nonexistent/dir", "working directory")
    assert.equal("ENOTDIR", errs[file].code)
    assert.equal(file, errs[file].path)
    os.remove(file)
    H.finish()
  end)

  -- A "worker" that is a shell writing raw bytes to fd 3: the master must survive
  -- whatever arrives on a channel.
  local function fork_raw_writer(bytes)
    cluster.setupMaster({ execPath = "/bin/sh",
                          execArgv = { "-c", "printf '" .. bytes .. "' >&3; exec sleep 5", "sh" } })
    local w = cluster.fork()
    cluster.setupMaster({ execPath = require("cluster.core").exepath(), execArgv = {} })
    return w
  end

  it("a worker that writes garbage to the channel gets an 'error' on it; the master goes on with the others", function()
    local good = cluster.fork()
    local garbage = {
      reserved_tag = "\\003\\000\\000\\000\\000\\316\\316\\316",
      over_limit = "\\377\\377\\377\\377\\000",
      bad_flags = "\\001\\000\\000\\000\\200\\300",
      too_deep = "\\055\\001\\000\\000\\000" .. string.rep("\\261", 300) .. "\\300",
      trailing = "\\003\\000\\000\\000\\000\\300\\300\\300",
    }
    local errs, bad = {}, {}
    for name, bytes in pairs(garbage) do
      local w = fork_raw_writer(bytes)
      bad[name] = w
      w:on("error", H.expect(function(e) errs[name] = e end))
      w:on("message", H.expect(nil, 0))
    end
    cluster.on("message", function(w) assert.equal(good, w) end)
    assert.is_true(H.wait_until(function()
      for name in pairs(garbage) do if not errs[name] then return false end end
      return true
    end, 5000))
    for name, w in pairs(bad) do
      assert.is_false(w:isConnected(), name)
      local e = errs[name]
      assert.equal("EPROTO", e.code, name)
      assert.equal("channel", e.syscall, name)
      assert.equal("number", type(e.errno), name)
      assert.truthy(tostring(e):find("^channel EPROTO: "), tostring(e))
    end
    -- the master still talks to the healthy worker
    local echoed
    good:on("message", function(m) echoed = m end)
    good:send({ still = "here" })
    assert.is_true(H.wait_until(function() return echoed ~= nil end, 5000))
    assert.same({ still = "here" }, echoed)
    good:kill()
    for _, w in pairs(bad) do w:kill() end
    H.finish()
  end)

  it("a frame that announces a descriptor which did not come is a message without one (the kernel drops descriptors a process has no room for): the channel stays open", function()
    local w = fork_raw_writer("\\001\\000\\000\\000\\002\\300")
    local got
    w:on("message", H.expect(function(msg, handle) got = { msg = msg, handle = handle } end, 1))
    w:on("error", H.expect(nil, 0))
    assert.is_true(H.wait_until(function() return got ~= nil end, 5000))
    assert.same({}, got)
    assert.is_true(w:isConnected())
    w:kill()
    H.finish()
  end)

  it("a worker cannot make the master build a flood of tables: a message of more than 2^20 is refused", function()
    -- 2^20 + 1 empty tables in a message of 1 MiB and 6 bytes (an array, 0xcd, of 0xb0s)
    cluster.setupMaster({ execPath = "/bin/sh", execArgv = { "-c",
      "{ printf '\\006\\000\\020\\000\\000\\315\\201\\200\\100\\000'; " ..
      "head -c 1048577 /dev/zero | tr '\\000' '\\260'; } >&3; exec sleep 5", "sh" } })
    local w = cluster.fork()
    cluster.setupMaster({ execPath = require("cluster.core").exepath(), execArgv = {} })
    local err
    w:on("error", function(e) err = e end)
    w:on("message", H.expect(nil, 0))
    assert.is_true(H.wait_until(function() return err ~= nil end, 5000))
    assert.equal("EPROTO", err.code)
    has(tostring(err), "more tables than a message may hold")
    w:kill()
    collectgarbage()
    H.finish()
  end)

  -- the master's open descriptors
  local function fd_count()
    local p = io.popen("ls /proc/" .. require("cluster.core").getpid() .. "/fd")
    local n = 0
    for _ in p:lines() do n = n + 1 end
    p:close()
    return n
  end

  it("descriptors a worker sends with messages that take none are closed at once, not kept", function()
    cluster.setupMaster({ exec = H.fixture("handle_abuser.lua") })
    for _, how in ipairs { "unknown_act", "user_handle" } do
      local before = fd_count()
      local w = cluster.fork({ HANDLE_ABUSE = how })
      local done, user_handles = false, 0
      w:on("message", function(m, handle)
        if handle ~= nil then user_handles = user_handles + 1 end
        if m == "done" then done = true end
      end)
      assert.is_true(H.wait_until(function() return done end, 5000), how)
      H.run_for(50)
      -- the worker and its channel cost a few; 200 kept descriptors would show
      assert.is_true(fd_count() - before < 20, how .. ": " .. (fd_count() - before) .. " more descriptors")
      assert.equal(0, user_handles, how)
      w:kill()
      assert.is_true(H.wait_until(function() return w:isDead() end, 5000))
    end
    H.finish()
  end)

  it("a socket a worker sends that fails its first read does not end the master: closed, its error on that worker", function()
    cluster.setupMaster({ exec = H.fixture("handle_abuser.lua") })
    for _, listening in ipairs { false, true } do
      local w = cluster.fork({ HANDLE_ABUSE = "bad_socket" })
      local done, got, err = false, nil, nil
      if listening then
        w:on("message", function(m, handle) if m == "a socket" then got = handle end end)
      end
      -- (a listener for "done" only: the socket's message finds the one above, or none)
      cluster.on("message", function(_, m) if m == "done" then done = true end end)
      w:on("error", function(e) err = e end)
      assert.is_true(H.wait_until(function() return done end, 5000))
      if listening then
        assert.is_true(H.wait_until(function() return err ~= nil end, 5000), "no error reported on the worker")
        assert.truthy(got)
        assert.is_true(got.destroyed)
      end
      H.run_for(50) -- and the loop goes on: the master did not raise
      cluster.off("message")
      w:kill()
      assert.is_true(H.wait_until(function() return w:isDead() end, 5000))
    end
    H.finish()
  end)

  -- builds spec/fixtures/<name>.c into a file teardown removes
  local function build_fixture(name)
    local binary = H.tmpfile(name)
    assert(os.execute(string.format("cc -o %s %s", H.shell_quote(binary), H.shell_quote(H.fixture(name .. ".c")))),
      "cc could not build " .. name .. ".c")
    return binary
  end

  it("a batch of hand-offs that a read splits is waited for, not taken for a broken protocol (all 8 arrive)", function()
    local binary = build_fixture("batch_split_master")
    for _, filler in ipairs { 1000, 65500 } do -- (65,500 bytes ahead: the 64 KiB read ends inside the batch)
      local out = H.tmpfile("batch-split-out")
      local ok = os.execute(string.format("cd %s && %s %d lua5.4 %s > %s 2>&1", H.shell_quote(H.ROOT), H.shell_quote(binary),
        filler, H.shell_quote(H.fixture("batch_split_worker.lua")), H.shell_quote(out)))
      assert(ok, H.read_file(out))
      has(H.read_file(out), "connections received: 8 of 8; channel healthy")
    end
    H.finish()
  end)

  it("descriptors sent with no message to carry them break the protocol: the worker's channel is dropped with an 'error'", function()
    local binary = build_fixture("fd_without_frame")
    cluster.setupMaster({ execPath = binary, execArgv = {} })
    local w = cluster.fork()
    cluster.setupMaster({ execPath = require("cluster.core").exepath(), execArgv = {} })
    local err, code
    w:on("error", function(e) err = e end)
    w:on("exit", function(c) code = c end)
    -- (its messages, complete, may still arrive; the descriptors that came with them are the fault)
    assert.is_true(H.wait_until(function() return err ~= nil and code ~= nil end, 5000))
    assert.equal("EPROTO", err.code)
    has(tostring(err), "descriptor that no message carries")
    assert.equal(0, code) -- it saw its channel close
    H.finish()
  end)

  it("a worker that dies in the middle of a message does not disturb the master", function()
    local good = cluster.fork()
    -- announces 100 bytes, sends 3, exits
    cluster.setupMaster({ execPath = "/bin/sh",
                          execArgv = { "-c", "printf '\\144\\000\\000\\000\\000abc' >&3", "sh" } })
    local w = cluster.fork()
    cluster.setupMaster({ execPath = require("cluster.core").exepath(), execArgv = {} })
    w:on("message", H.expect(nil, 0))
    local code
    w:on("exit", function(c) code = c end)
    assert.is_true(H.wait_until(function() return code ~= nil and not w:isConnected() end, 5000))
    assert.equal(0, code)
    local echoed
    good:on("message", function(m) echoed = m; good:kill() end)
    good:send("ok")
    assert.is_true(H.wait_until(function() return echoed ~= nil end, 5000))
    H.finish()
  end)

  it("sending to a worker that is gone returns false and passes an error to the callback", function()
    local w = cluster.fork({ FIXTURE_MODE = "exit" })
    assert.is_true(H.wait_until(function() return w:isDead() and not w:isConnected() end, 5000))
    local cb_err
    assert.is_false(w:send("late", function(e) cb_err = e end))
    assert.is_true(H.wait_until(function() return cb_err ~= nil end, 2000))
    assert.equal("ERR_IPC_CHANNEL_CLOSED", cb_err.code)
    H.finish()
  end)
end)
