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

-- A delay below 1 ms is 1 ms, as in Node: a timer started from a timer callback is
-- then never due in the turn that runs it (libuv runs the timers that are due until none
-- is left, so a callback that started itself again at 0 ms would keep the loop there).
local function check_ms(fname, ms)
  if ms == nil then return 1 end
  -- the upper bound keeps the delay an integer libuv can add to its clock
  if type(ms) ~= "number" or ms ~= ms or ms < 0 or ms >= 2 ^ 53 then
    errors.raise(fname .. ": bad argument #2 (delay): expected a number of milliseconds >= 0 and < 2^53, got " .. tostring(ms))
  end
  return ms < 1 and 1 or math.tointeger(math.floor(ms))
end

-- libuv counts a delay from the loop's clock, read once per turn (and not at all between
-- runs): a timer started after a long computation, or long after the last poll(), would
-- fire early. Node counts from the call; so does this, by adding how far the clock lags.
-- (Updating the clock instead could make a timer started in a timer callback due in the
-- same turn.)
local function from_now(ms)
  local lag = math.floor(core.hrtime() * 1000 - core.now())
  if lag > 0 then return ms + lag end
  return ms
end

local Timer = {}
Timer.__index = Timer

--- Keeps the loop from waiting for this timer. @treturn self
function Timer:unref()
  self.unrefd = true
  if self.handle then self.handle:unref() end
  return self
end
--- Undoes unref. @treturn self
function Timer:ref()
  self.unrefd = false
  if self.handle then self.handle:ref() end
  return self
end
--- Whether the timer keeps the loop running (false after unref()), as Node's. @treturn boolean
function Timer:hasRef() return not self.unrefd end

local function new_timer(fn, ms, repeat_ms, ...)
  local t = setmetatable({}, Timer)
  local n, args = select("#", ...), { ... }
  local handle = core.timer()
  t.handle = handle
  handle:start(from_now(ms), repeat_ms, function()
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
  return new_timer(fn, check_ms("setTimeout", ms), 0, ...)
end

--- Runs fn(...) every ms milliseconds. @treturn table a timer for clearInterval
function M.setInterval(fn, ms, ...)
  check_fn("setInterval", fn)
  ms = check_ms("setInterval", ms)
  return new_timer(fn, ms, ms, ...)
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
-- One idle handle (csrc/idle.c) serves every turn: started only while calls are queued,
-- so it keeps the loop alive exactly then, and the poll does not wait meanwhile. Calls
-- deferred by a deferred call run on the turn after, once the I/O ready by then has
-- been handled (a function that defers itself again never holds the loop, as Node's
-- setImmediate does not). No allocation per turn beyond the queued call itself.
local queue, armed, defer_handle = {}, false, nil

local run_deferred

local function arm()
  if armed then return end
  armed = true
  if not defer_handle then defer_handle = core.idle() end
  defer_handle:start(run_deferred)
end

-- When a deferred call raises, the error goes up to run()/poll() as any callback's does;
-- the calls queued after it must still run on a later turn, not be lost.
local function requeue_rest(q, from)
  local rest = {}
  for j = from, #q do rest[#rest + 1] = q[j] end
  for j = 1, #queue do rest[#rest + 1] = queue[j] end
  queue = rest
  if #queue > 0 then arm() end
end

function run_deferred()
  local q = queue
  queue = {}
  armed = false
  defer_handle:stop()
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

--- Calls fn(...) on the next turn of the loop (Node's setImmediate).
function M.defer(fn, ...)
  check_fn("defer", fn)
  queue[#queue + 1] = { fn, n = select("#", ...) + 1, ... }
  arm()
end

--- Gives a class of objects that own a handle in `self._handle` the methods
-- `unref()` (the loop may end while the object is open) and `ref()` (undoes it).
-- `self._unref` remembers the choice for a handle the object gets later; a destroyed
-- object's handle is left alone.
function M.refMethods(class)
  function class:unref()
    self._unref = true
    if self._handle and not self.destroyed then self._handle:unref() end
    if self._onRef then self:_onRef() end -- (a round-robin server has no handle: see sharing)
    return self
  end
  function class:ref()
    self._unref = false
    if self._handle and not self.destroyed then self._handle:ref() end
    if self._onRef then self:_onRef() end
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
