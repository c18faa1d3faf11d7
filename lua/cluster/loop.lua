--- The event loop and timers, shared by both roles.
-- @module cluster.loop
local core = require "cluster.core"
local errors = require "cluster.errors"

local M = {}
local type, select, error, unpack = type, select, error, table.unpack

local function check_fn(fname, fn)
  if type(fn) ~= "function" then
    errors.raise(fname .. ": bad argument #1 (callback): expected a function, got " .. type(fn))
  end
end

local function check_ms(fname, ms)
  if ms == nil then return 0 end
  -- the upper bound keeps the delay an integer libuv can add to its clock
  if type(ms) ~= "number" or ms ~= ms or ms < 0 or ms >= 2 ^ 53 then
    errors.raise(fname .. ": bad argument #2 (delay): expected a number of milliseconds >= 0 and < 2^53, got " .. tostring(ms))
  end
  return math.tointeger(math.floor(ms))
end

local Timer = {}
Timer.__index = Timer

--- Keeps the loop from waiting for this timer. @treturn self
function Timer:unref() if self.handle then self.handle:unref() end return self end
--- Undoes unref. @treturn self
function Timer:ref() if self.handle then self.handle:ref() end return self end

local function new_timer(fname, fn, ms, repeat_ms, ...)
  local t = setmetatable({}, Timer)
  local n, args = select("#", ...), { ... }
  local handle = core.timer()
  t.handle = handle
  handle:start(ms, repeat_ms, function()
    if repeat_ms == 0 then
      t.handle = nil
      handle:close()
    end
    fn(unpack(args, 1, n))
  end)
  return t
end

--- Runs fn(...) once after ms milliseconds. @treturn table a timer for clearTimeout
function M.setTimeout(fn, ms, ...)
  check_fn("setTimeout", fn)
  return new_timer("setTimeout", fn, check_ms("setTimeout", ms), 0, ...)
end

--- Runs fn(...) every ms milliseconds. @treturn table a timer for clearInterval
function M.setInterval(fn, ms, ...)
  check_fn("setInterval", fn)
  ms = check_ms("setInterval", ms)
  if ms == 0 then ms = 1 end
  return new_timer("setInterval", fn, ms, ms, ...)
end

--- Cancels a timer from setTimeout or setInterval (nil and fired timers are ignored).
function M.clearTimeout(t)
  if t == nil then return end
  if getmetatable(t) ~= Timer then
    error("clearTimeout: bad argument #1 (timer): expected a timer from setTimeout/setInterval, got " .. type(t), 2)
  end
  local handle = t.handle
  if handle then
    t.handle = nil
    handle:close()
  end
end
M.clearInterval = M.clearTimeout

-- Deferred calls: run on the next loop turn, in order, never inside the caller.
-- One timer handle serves every turn (started only while calls are queued, so it keeps
-- the loop alive exactly then); no allocation per turn beyond the queued call itself.
local queue, armed, defer_handle = {}, false, nil

local run_deferred

local function arm(ms)
  if armed then return end
  armed = true
  if not defer_handle then defer_handle = core.timer() end
  defer_handle:start(ms, 0, run_deferred)
end

-- When a deferred call raises, the error goes up to run()/poll() as any callback's does;
-- the calls queued after it must still run on a later turn, not be lost.
local function requeue_rest(q, from)
  local rest = {}
  for j = from, #q do rest[#rest + 1] = q[j] end
  for j = 1, #queue do rest[#rest + 1] = queue[j] end
  queue = rest
  -- 1 ms, not 0: a 0 ms timer would still run in this turn, before run() re-raises
  if #queue > 0 then armed = false arm(1) end
end

function run_deferred()
  local q = queue
  queue = {}
  armed = false
  local pos = 0
  local finished = false
  local _ <close> = setmetatable({}, { __close = function()
    if not finished then requeue_rest(q, pos + 1) end
  end })
  for i = 1, #q do
    pos = i
    local item = q[i]
    item[1](unpack(item, 2, item.n))
  end
  finished = true
end

--- Calls fn(...) on the next turn of the loop (Node's process.nextTick / setImmediate).
function M.defer(fn, ...)
  queue[#queue + 1] = { fn, n = select("#", ...) + 1, ... }
  arm(0)
end

--- Gives a class of objects that own a handle in `self._handle` the methods
-- `unref()` (the loop may end while the object is open) and `ref()` (undoes it).
-- `self._unref` remembers the choice for a handle the object gets later; a destroyed
-- object's handle is left alone.
function M.refMethods(class)
  function class:unref()
    self._unref = true
    if self._handle and not self.destroyed then self._handle:unref() end
    return self
  end
  function class:ref()
    self._unref = false
    if self._handle and not self.destroyed then self._handle:ref() end
    return self
  end
end

--- Runs the loop until nothing is left to do or stop() is called.
-- An error raised in a callback stops the loop and is re-raised here with its traceback.
function M.run() return core.run() end
--- Runs what is ready without blocking. @treturn boolean whether work remains
function M.poll() return core.poll() end
--- Makes run() return.
function M.stop() return core.stop() end

return M
