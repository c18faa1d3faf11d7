-- Worker output: with `silent`, every line a worker writes reaches the master whole as
-- 'output'(worker, stream, line); under supervise the master prints it by default as
-- "[worker N] line" on its own stdout/stderr, lines never mixed mid-line even when two
-- workers write many long lines at once.
local cluster = require "cluster"
local H = require "helper"
local R = require "fixtures.sup_lib"

-- lines longer than stdio's and the pipe's buffers, so that they arrive in pieces
local LINES, WIDTH = 200, 70000

-- Checks that `lines` (worker id -> list of its stdout lines, prefix removed) hold
-- exactly lines 1..LINES of that worker's text, in order.
local function check_lines(by_worker, ids)
  for _, id in ipairs(ids) do
    local list = by_worker[id] or {}
    assert.equal(LINES, #list, "worker " .. id .. " lines")
    local fill = string.rep(string.char(64 + id), WIDTH)
    for i = 1, LINES do
      local line = list[i]
      assert.equal(string.format("line %d %s end", i, fill), line)
    end
  end
end

describe("supervise: worker output", function()
  before_each(function()
    H.setup()
    cluster.setupMaster { exec = H.fixture("sup_worker.lua"), args = {}, silent = true }
  end)
  after_each(function()
    pcall(cluster.shutdown, { grace = 0, killTimeout = 0 })
    H.teardown()
    cluster.setupMaster { silent = false }
  end)

  it("reaches the master line by line as 'output'(worker, stream, line), each line whole", function()
    local by_worker, stderr_lines, bad = {}, {}, {}
    cluster.on("output", function(w, stream, line)
      if stream == "stdout" then
        local list = by_worker[w.id] or {}
        by_worker[w.id] = list
        list[#list + 1] = line
      elseif stream == "stderr" then
        stderr_lines[#stderr_lines + 1] = w.id .. ":" .. line
      else
        bad[#bad + 1] = stream
      end
    end)
    local rec = R.record(cluster)
    cluster.supervise {
      workers = 2, readiness = "explicit", env = { SUP_MODE = "print", SUP_LINES = tostring(LINES), SUP_WIDTH = tostring(WIDTH), SUP_TAIL = "tail" },
      grace = 200, killTimeout = 200, signals = false, output = false,
    }
    assert.is_true(H.wait_until(function() return #stderr_lines >= 2 end, 10000), rec.dump())
    local ids = {}
    for id in pairs(cluster.workers) do ids[#ids + 1] = id end
    table.sort(ids)
    assert.equal(2, #ids)
    H.wait_until(function()
      return #(by_worker[ids[1]] or {}) >= LINES and #(by_worker[ids[2]] or {}) >= LINES
    end, 5000)
    check_lines(by_worker, ids)
    table.sort(stderr_lines)
    assert.same({ ids[1] .. ":done", ids[2] .. ":done" }, stderr_lines)
    assert.same({}, bad)
    local done = false
    cluster.shutdown(function() done = true end)
    assert.is_true(H.wait_until(function() return done end, 3000))
    -- the unfinished last line arrived when the worker's stdout closed
    assert.is_true(H.wait_until(function()
      return #by_worker[ids[1]] == LINES + 1 and #by_worker[ids[2]] == LINES + 1
    end, 3000))
    assert.equal("tail", by_worker[ids[1]][LINES + 1])
    assert.equal("tail", by_worker[ids[2]][LINES + 1])
    H.finish()
  end)

  it("a line longer than 1 MiB arrives in pieces of exactly 1 MiB, then the rest", function()
    local MAX = require("cluster.output").MAX_LINE
    local width = 2 * MAX + MAX // 2
    local pieces, done, id = {}, false, nil
    cluster.on("output", function(w, stream, line)
      id = w.id
      if stream == "stdout" then pieces[#pieces + 1] = line else done = true end
    end)
    cluster.supervise {
      workers = 1, readiness = "explicit", env = { SUP_MODE = "print", SUP_LINES = "1", SUP_WIDTH = tostring(width) },
      signals = false, output = false,
    }
    assert.is_true(H.wait_until(function() return done end, 10000))
    local whole = string.format("line 1 %s end", string.rep(string.char(64 + id), width))
    assert.equal(3, #pieces)
    assert.equal(MAX, #pieces[1])
    assert.equal(MAX, #pieces[2])
    assert.equal(#whole - 2 * MAX, #pieces[3])
    assert.is_true(table.concat(pieces) == whole, "the pieces are not the line")
    local stopped = false
    cluster.shutdown(function() stopped = true end)
    assert.is_true(H.wait_until(function() return stopped end, 3000))
    H.finish()
  end)
end)

describe("supervise: default printing of worker output", function()
  before_each(H.setup)
  after_each(H.teardown)

  it("prefixes each line with the worker id on the master's stdout/stderr, never mixing lines", function()
    local m = R.start_master(H, [[
      local cluster = ...
      cluster.setupMaster { silent = true }
      return { workers = 2, readiness = "explicit",
        env = { SUP_MODE = "print", SUP_LINES = "]] .. LINES .. [[", SUP_WIDTH = "]] .. WIDTH .. [[" } }
    ]])
    assert.is_true(H.wait_until(function()
      local err = H.read_file(m.err) or ""
      local n = 0
      for _ in err:gmatch("%] done\n") do n = n + 1 end
      return n >= 2
    end, 10000), m.output())
    require("cluster.core").kill(m.pid, "SIGTERM")
    assert.equal(0, m.wait_exit(5000), m.output())
    local ids = {}
    for _, e in ipairs(m.all("fork")) do ids[#ids + 1] = e.id end
    table.sort(ids)
    assert.equal(2, #ids)
    -- every stdout line is an event line or a whole prefixed worker line
    local by_worker, stray = {}, {}
    for line in H.read_file(m.out):gmatch("([^\n]*)\n") do
      local id, rest = line:match("^%[worker (%d+)%] (.*)$")
      if id then
        id = math.tointeger(tonumber(id))
        local list = by_worker[id] or {}
        by_worker[id] = list
        list[#list + 1] = rest
      elseif not (line:match("^EVENT ") or line:match("^MASTER %d+$") or line == "RUN RETURNED") then
        stray[#stray + 1] = line:sub(1, 80)
      end
    end
    assert.same({}, stray)
    check_lines(by_worker, ids)
    -- stderr lines are prefixed too
    local err = H.read_file(m.err)
    for _, id in ipairs(ids) do
      assert.truthy(err:find("[worker " .. id .. "] done\n", 1, true), err)
    end
    H.cleanup_master(m)
    H.finish()
  end)

  it("ends with its supervisor: a second supervisor after a shutdown prints each line once", function()
    local m = R.start_master(H, [[
      local cluster = ...
      cluster.setupMaster { silent = true }
      local options = { workers = 1, readiness = "explicit", env = { SUP_MODE = "print", SUP_LINES = "1", SUP_WIDTH = "3" } }
      cluster.once("ready", function()
        cluster.setTimeout(function()
          cluster.shutdown(function() cluster.supervise(options) end)
        end, 200)
      end)
      return options
    ]])
    assert.is_true(H.wait_until(function()
      return select(2, (H.read_file(m.err) or ""):gsub("%] done\n", "")) >= 2
    end, 10000), m.output())
    H.run_for(200)
    require("cluster.core").kill(m.pid, "SIGTERM")
    assert.equal(0, m.wait_exit(5000), m.output())
    local out, err = H.read_file(m.out), H.read_file(m.err)
    assert.equal(1, select(2, out:gsub("%[worker 1%] line 1 AAA end\n", "")), m.output())
    assert.equal(1, select(2, out:gsub("%[worker 2%] line 1 BBB end\n", "")), m.output())
    assert.equal(1, select(2, err:gsub("%[worker 2%] done\n", "")), m.output())
    H.cleanup_master(m)
    H.finish()
  end)
end)
