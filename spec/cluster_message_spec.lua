-- Messages between master and worker: every value kind round-trips with its exact type,
-- order holds, big messages arrive, too-big ones raise at send, internal messages stay
-- internal. Node's test-cluster-message (without its TCP part) and -invalid-message.
local cluster = require "cluster"
local core = require "cluster.core"
local H = require "helper"

-- Deep equality that also compares math.type of numbers and treats NaN as equal to NaN.
local function same(a, b, path)
  path = path or "message"
  if type(a) ~= type(b) then return false, path .. ": " .. type(a) .. " vs " .. type(b) end
  if type(a) == "number" then
    if math.type(a) ~= math.type(b) then return false, path .. ": " .. math.type(a) .. " vs " .. math.type(b) end
    if a ~= a and b ~= b then return true end
    if a ~= b then return false, path .. ": " .. tostring(a) .. " vs " .. tostring(b) end
    if a == 0 and math.type(a) == "float" and 1 / a ~= 1 / b then return false, path .. ": sign of zero" end
    return true
  end
  if type(a) ~= "table" then
    if a ~= b then return false, path .. ": values differ" end
    return true
  end
  for k, v in pairs(a) do
    local ok, why = same(v, b[k], path .. "[" .. tostring(k) .. "]")
    if not ok then return false, why end
  end
  for k in pairs(b) do
    if a[k] == nil then return false, path .. ": extra key " .. tostring(k) end
  end
  return true
end

local function all_bytes()
  local t = {}
  for i = 0, 255 do t[#t + 1] = string.char(i) end
  return table.concat(t)
end

local function nested(depth)
  local root = { level = 0 }
  local t = root
  for i = 1, depth do
    t.child = { level = i }
    t = t.child
  end
  return root
end

describe("cluster messages", function()
  local w
  before_each(function()
    H.setup()
    cluster.setupMaster { exec = H.fixture("worker.lua") }
    w = cluster.fork()
  end)
  after_each(H.teardown)

  it("round-trips every value kind master -> worker -> master with its exact type", function()
    local values = {
      true, false, 0, 1, -1, 127, 128, -32, -33, 255, 256, 65535, 65536, -129,
      2 ^ 31, math.tointeger(2 ^ 31), math.tointeger(2 ^ 53) + 1, math.maxinteger, math.mininteger,
      0.0, -0.0, 1.0, -1.0, 0.5, 0.1, 3.14159, 1e300, -1e-300, 2 ^ 63, math.huge, -math.huge, 0 / 0,
      "", "a", string.rep("s", 31), string.rep("s", 32), string.rep("m", 300), string.rep("l", 70000),
      all_bytes(), "with\0zero\0bytes", "\xff\xfe\x00\x80",
      {}, { 1, 2, 3 }, { "a", "b", { "c" } }, { x = 1, y = 2.0, z = "three" },
      { 1, 2, x = "mixed", [10] = "sparse", [-1] = "negative", [1.5] = "float key", [true] = false },
      { [1] = "a", [3] = "hole" }, { nested = { deeper = { deepest = { 1, 2.5, "s", false } } } },
      { bin = all_bytes(), empty = {}, list = { {}, {}, { {} } } },
      nested(150),
    }
    local big_table = {}
    for i = 1, 1000 do big_table[i] = { i, i + 0.5, tostring(i) } end
    values[#values + 1] = big_table

    local got, n = {}, 0
    w:on("message", function(m)
      n = n + 1
      got[n] = m
    end)
    for _, v in ipairs(values) do assert.is_true(w:send(v)) end
    w:send(nil)
    -- nil arrives too, as one more 'message' event
    local arrived = H.wait_until(function() return n == #values + 1 end, 5000)
    assert(arrived, "arrived " .. n .. " of " .. #values + 1)
    assert.is_nil(got[#values + 1])
    for i, v in ipairs(values) do
      local ok, why = same(v, got[i], "values[" .. i .. "]")
      assert(ok, why)
    end
    w:kill()
    H.finish()
  end)

  it("keeps the order of 10000 messages each way", function()
    local N = 10000
    local echoed, counted = {}, {}
    w:on("message", function(m)
      if type(m) == "table" then echoed[#echoed + 1] = m[1] else counted[#counted + 1] = m end
    end)
    for i = 1, N do w:send({ i }) end
    w:send({ cmd = "count", n = N })
    assert.is_true(H.wait_until(function() return #echoed == N and #counted == N end, 10000))
    for i = 1, N do
      if echoed[i] ~= i then error("echo " .. i .. " arrived as " .. tostring(echoed[i])) end
      if counted[i] ~= i then error("count " .. i .. " arrived as " .. tostring(counted[i])) end
    end
    w:kill()
    H.finish()
  end)

  it("delivers a 10 MiB message each way", function()
    local size = 10 * 1024 * 1024
    local chunk = all_bytes()
    local big = string.rep(chunk, size // #chunk)
    local got = {}
    w:on("message", function(m) got[#got + 1] = m end)
    w:send(big)
    w:send({ cmd = "big", size = size })
    assert.is_true(H.wait_until(function() return #got == 2 end, 10000))
    assert.equal(size, #got[1])
    assert.is_true(got[1] == big)
    assert.equal(string.rep("x", size), got[2])
    w:kill()
    H.finish()
  end)

  it("raises a clear error at send for a message over core.MAX_MESSAGE, and the channel goes on", function()
    local too_big = string.rep("x", core.MAX_MESSAGE + 1)
    local ok, err = pcall(w.send, w, too_big)
    too_big = nil
    collectgarbage()
    assert.is_false(ok)
    err = tostring(err)
    assert.truthy(err:find("send", 1, true), err)
    assert.truthy(err:find("limit", 1, true), err)
    assert.truthy(err:find(tostring(core.MAX_MESSAGE), 1, true), err)
    local echoed
    w:on("message", function(m) echoed = m end)
    w:send("after")
    assert.is_true(H.wait_until(function() return echoed ~= nil end, 5000))
    assert.equal("after", echoed)
    w:kill()
    H.finish()
  end)

  it("never shows internal messages to user 'message' listeners, on either side", function()
    local msgs = {}
    w:on("message", function(m) msgs[#msgs + 1] = m end)
    cluster.on("message", function(_, m) msgs[#msgs + 1] = m end)
    -- the worker's 'online' (internal) has come and gone by the time it echoes
    local online = false
    w:on("online", function() online = true end)
    assert.is_true(H.wait_until(function() return online end, 5000))
    -- an internal message the worker does not know is dropped, not shown to its listeners
    cluster._sendInternal(w, { act = "no-such-act", payload = "hidden" })
    w:send("visible")
    assert.is_true(H.wait_until(function() return #msgs >= 2 end, 5000))
    H.run_for(50)
    assert.same({ "visible", "visible" }, msgs)
    w:kill()
    H.finish()
  end)

  it("runs send callbacks once each, with no error, in order", function()
    local order = {}
    for i = 1, 5 do
      w:send({ i = i }, H.expect(function(...)
        assert.equal(1, select("#", ...))
        assert.is_nil((...))
        order[#order + 1] = i
      end))
    end
    w:send("handle-less with callback", nil, H.expect(function(err) assert.is_nil(err) end))
    assert.is_true(H.wait_until(function() return #order == 5 end, 5000))
    H.run_for(20)
    assert.same({ 1, 2, 3, 4, 5 }, order)
    w:kill()
    H.finish()
  end)

  it("emits 'message' on cluster with (worker, message, handle)", function()
    local args
    cluster.on("message", H.expect(function(...) args = table.pack(...) end))
    w:send({ hello = "cluster" })
    assert.is_true(H.wait_until(function() return args ~= nil end, 5000))
    assert.equal(3, args.n)
    assert.equal(w, args[1])
    assert.same({ hello = "cluster" }, args[2])
    assert.is_nil(args[3])
    w:kill()
    H.finish()
  end)

  it("message (Node test-cluster-message, without its TCP part): the worker gets the master's message; the master gets the worker's on the worker and on cluster", function()
    local checks = {}
    w:on("message", H.expect(function(m) checks.worker = m end))
    cluster.on("message", H.expect(function(from, m)
      assert.equal(w, from)
      checks.global = m
    end))
    w:on("online", function() w:send("message from master") end)
    assert.is_true(H.wait_until(function() return checks.worker and checks.global end, 5000))
    assert.equal("message from master", checks.worker)   -- the echo proves the worker got it
    assert.equal("message from master", checks.global)
    w:kill()
    H.finish()
  end)

  it("invalid-message (Node test-cluster-invalid-message): user messages shaped like internal ones are plain messages; disconnect from a send callback ends the worker with code 0", function()
    local got, flags = {}, {}
    w:on("message", function(m)
      got[#got + 1] = m
      flags[#flags + 1] = tostring(w.exitedAfterDisconnect)
    end)
    local exit_args
    w:on("exit", H.expect(function(code, signal) exit_args = { code, signal } end))
    w:on("online", function()
      w:send({ act = "exitedAfterDisconnect" })
      w:send({ act = "online" })
      w:send({ act = "disconnect" })
      w:send({ cmd_like = "NODE_CLUSTER", ack = -1 }, function()
        cluster.setTimeout(function() w:disconnect() end, 50)
      end)
    end)
    assert.is_true(H.wait_until(function() return exit_args ~= nil end, 5000))
    assert.equal(0, exit_args[1])
    assert.is_nil(exit_args[2])
    assert.equal(4, #got)
    assert.same({ act = "exitedAfterDisconnect" }, got[1])
    assert.same({ act = "disconnect" }, got[3])
    -- the user message named exitedAfterDisconnect did not set the flag; disconnect() did
    assert.same({ "nil", "nil", "nil", "nil" }, flags)
    assert.is_true(w.exitedAfterDisconnect)
    H.finish()
  end)

  it("delivers everything a worker sent when its script ends without running the loop", function()
    w:kill()
    local v = cluster.fork({ FIXTURE_MODE = "send_and_end" })
    local got, code = {}, nil
    v:on("message", function(m) got[#got + 1] = m end)
    v:on("exit", function(c) code = c end)
    assert.is_true(H.wait_until(function() return code ~= nil and not v:isConnected() end, 5000))
    assert.equal(0, code)
    assert.equal(1002, #got)
    for i = 1, 1000 do assert.equal(i, got[i]) end
    assert.equal(1024 * 1024, #got[1001])
    assert.equal("last", got[1002])
    H.finish()
  end)

  it("worker:disconnect() loses no message: what either side sent before it arrives, however big", function()
    local size = 8 * 1024 * 1024
    local got = {}
    w:on("message", function(m) got[#got + 1] = m end)
    local code
    w:on("exit", function(c) code = c end)
    w:on("online", function()
      w:send(string.rep("m", size))          -- echoed back by the worker
      w:send({ cmd = "big", size = size })   -- the worker answers with a big string
      w:disconnect()
    end)
    assert.is_true(H.wait_until(function() return code ~= nil and not w:isConnected() end, 10000))
    assert.equal(0, code)
    assert.equal(2, #got)
    assert.equal(string.rep("m", size), got[1])
    assert.equal(string.rep("x", size), got[2])
    H.finish()
  end)

  it("a worker's send without a callback after its channel closed gives ERR_IPC_CHANNEL_CLOSED on cluster.worker's 'error', or on stderr with no listener", function()
    w:kill()
    cluster.setupMaster { exec = H.fixture("life_send_closed.lua"), silent = true }
    local heard = cluster.fork({ FIXTURE_LISTEN = "1" })
    local unheard = cluster.fork()
    cluster.setupMaster { silent = false }
    local codes, stderr = {}, {}
    cluster.on("output", function(v, stream, line)
      if v == unheard and stream == "stderr" then stderr[#stderr + 1] = line end
    end)
    for _, v in ipairs { heard, unheard } do
      v:on("online", function() v:disconnect() end)
      v:on("exit", function(code) codes[v] = code end)
    end
    assert.is_true(H.wait_until(function() return codes[heard] and codes[unheard] end, 5000))
    assert.equal(7, codes[heard])
    assert.equal(0, codes[unheard])
    assert.same({ ("cluster: worker %d: channel closed"):format(unheard.id) }, stderr)
    H.finish()
  end)

  it("a worker's last messages before os.exit() reach the master, before its 'exit' (as Node's synchronous pipe writes deliver them)", function()
    w:kill()
    cluster.setupMaster { exec = H.fixture("life_send_then_exit.lua") }
    local v = cluster.fork()
    cluster.setupMaster { exec = H.fixture("worker.lua") }
    local got, code = {}, nil
    v:on("message", function(m) got[#got + 1] = #m end)
    v:on("exit", function(c) code = c end)
    assert.is_true(H.wait_until(function() return code ~= nil end, 5000))
    assert.equal(3, code)
    assert.same({ 3, 1 << 20 }, got)
    H.finish()
  end)

  it("a send the channel's end leaves unwritten still calls back (EPIPE, as Node), before 'disconnect'", function()
    w:kill()
    cluster.setupMaster { exec = H.fixture("msg_worker.lua") }
    local v = cluster.fork({ FIXTURE_MODE = "bye" })
    cluster.setupMaster { exec = H.fixture("worker.lua") }
    local events = {}
    v:on("message", function()
      v:send("reply", function(err) events[#events + 1] = "callback " .. (err and err.code or "ok") end)
    end)
    v:on("disconnect", function() events[#events + 1] = "disconnect" end)
    v:on("exit", function() events[#events + 1] = "exit" end)
    -- the loop does not run until the worker is gone: its message and the end of its
    -- channel wait to be read in one turn
    local t = os.time()
    while H.alive(v.process.pid) and os.time() - t < 5 do end
    assert.is_true(H.wait_until(function() return #events == 3 end, 5000), table.concat(events, ", "))
    -- (the reply may also have gone out before the channel's end was read: then "ok")
    assert.is_truthy(events[1] == "callback EPIPE" or events[1] == "callback ok", table.concat(events, ", "))
    assert.same({ "disconnect", "exit" }, { events[2], events[3] })
    H.finish()
  end)

  it("worker:send returns true while connected", function()
    assert.is_true(w:send("x"))
    w:kill()
    H.finish()
  end)

  it("worker:send returns false once Worker.BACKLOG_LIMIT bytes wait to be written (Node's hint), and the message still goes", function()
    local Worker = require "cluster.worker"
    assert.equal(128 * 1024, Worker.BACKLOG_LIMIT)
    local got, after = {}, nil
    w:on("message", function(m) got[#got + 1] = m end)
    assert.is_true(w:send("small"))
    assert.is_false(w:send(string.rep("b", Worker.BACKLOG_LIMIT), H.expect(function(err)
      assert.is_nil(err)
      after = w:send("after")
    end)))
    assert.is_true(H.wait_until(function() return #got == 3 end, 5000))
    assert.is_true(after)
    assert.same({ "small", string.rep("b", Worker.BACKLOG_LIMIT), "after" }, got)
    w:kill()
    H.finish()
  end)

  it("cluster.worker:send returns false once Worker.BACKLOG_LIMIT bytes wait to be written, and the message still goes", function()
    w:kill()
    cluster.setupMaster { exec = H.fixture("msg_worker.lua") }
    local v = cluster.fork({ FIXTURE_MODE = "backlog" })
    local got = {}
    v:on("message", function(m) got[#got + 1] = m end)
    v:send({ size = 200 * 1024 })
    assert.is_true(H.wait_until(function() return #got == 4 end, 5000))
    assert.equal("small", got[1])
    assert.equal(string.rep("b", 200 * 1024), got[2])
    assert.equal("after", got[3])
    assert.same({ true, false, true }, got[4])
    v:kill()
    H.finish()
  end)

  it("a message no channel can carry raises at the call also once the channel is closed (no 'error', no callback)", function()
    local exited = false
    w:on("exit", function() exited = true end)
    w:send({ cmd = "exit", code = 0 })
    assert.is_true(H.wait_until(function() return exited end, 5000))
    w:on("error", function(e) error("unexpected 'error': " .. tostring(e)) end)
    local cycle = {}
    cycle.self = cycle
    local never = function() error("the callback of a send that raised ran") end
    local cases = {
      { { a = { 1, 2, { b = print } } }, "worker:send: message.a[3].b is a function" },
      { cycle, "worker:send: message.self is a cycle" },
      { coroutine.create(print), "worker:send: message is a thread" },
    }
    for _, case in ipairs(cases) do
      local ok, err = pcall(w.send, w, case[1], never)
      assert.is_false(ok)
      assert.equal(case[2], err)
    end
    -- raised at the caller's line, as on an open channel
    local ok, err = pcall(function() w:send({ f = print }) end)
    assert.is_false(ok)
    assert.truthy(err:find("^[^:]*cluster_message_spec%.lua:%d+: worker:send: message%.f is a function$"), err)
    H.run_for(30)
    H.finish()
  end)

  it("a message that cannot go with a handle names its own path, not the wrapper the handle travels in", function()
    local net = require "cluster.net"
    local server = net.createServer()
    server:listen(0, "127.0.0.1", H.expect(function()
      local cycle = {}
      cycle.me = cycle
      local ok, err = pcall(w.send, w, { a = { 1, { f = print } } }, server)
      assert.is_false(ok)
      assert.equal("worker:send: message.a[2].f is a function", err)
      ok, err = pcall(w.send, w, cycle, server, function() error("called back") end)
      assert.is_false(ok)
      assert.equal("worker:send: message.me is a cycle", err)
      server:close()
      w:kill()
    end))
    assert.is_true(H.wait_until(function() return w:isDead() end, 5000))
    H.finish()
  end)

  it("a worker's message no channel can carry raises also once its channel is closed", function()
    w:kill()
    cluster.setupMaster { exec = H.fixture("msg_worker.lua") }
    local v = cluster.fork({ FIXTURE_MODE = "closed" })
    local code
    v:on("online", function() v:disconnect() end)
    v:on("exit", function(c) code = c end)
    assert.is_true(H.wait_until(function() return code ~= nil end, 5000))
    assert.equal(5, code)
    H.finish()
  end)
end)
