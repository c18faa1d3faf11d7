-- The soak's report: the table of samples, and a verdict per metric.
--   lua5.4 bench/soak/report.lua SAMPLES_FILE TITLE
-- SAMPLES_FILE holds one line of key=value pairs per sample (written by bench/soak/run).
-- Verdicts compare the first quiet sample ("Q") with the last; with fewer than two quiet
-- samples, the first sample after the warm-up with the last one (and say so). With three
-- or more quiet samples, the least-squares trend per 1000 workers churned is shown too.
local path, title = arg[1], arg[2] or ""
local f = assert(io.open(path, "r"))
local samples = {}
for line in f:lines() do
  local s = {}
  for k, v in line:gmatch("([%w_]+)=(%S+)") do s[k] = tonumber(v) or v end
  if s.tag then
    -- what malloc has handed out and not got back, without the block cache's blocks
    if s.malloc_in_use then
      s.m_malloc_nc = ((tonumber(s.malloc_in_use) or 0) - (tonumber(s.block_cache) or 0)) // 1024
    end
    samples[#samples + 1] = s
  end
end
f:close()
if #samples == 0 then
  print(title .. ": no samples")
  os.exit(1)
end

local function num(s, k) return tonumber(s[k]) or 0 end
local function conns(s) return num(s, "load_conns") + num(s, "master_conns") end
local function handles(s) return num(s, "handles_out") + num(s, "handles_in") end

-- the table
local cols = {
  { "t(s)", function(s) return s.wall end },
  { "tag", function(s) return s.tag end },
  { "workers churned", function(s) return num(s, "exited") end },
  { "conns", conns },
  { "msgs", function(s) return num(s, "msgs") end },
  { "big MB", function(s) return s.big_mb end },
  { "handles", handles },
  { "reloads", function(s) return num(s, "reloads") end },
  { "M rss kB", function(s) return num(s, "m_rss") end },
  { "M fd", function(s) return num(s, "m_fd") end },
  { "M heap kB", function(s) return string.format("%.0f", num(s, "heap_kb")) end },
  { "M cache kB", function(s) return num(s, "block_cache") // 1024 end },
  { "M malloc kB", function(s) return s.malloc_in_use and num(s, "malloc_in_use") // 1024 or "-" end },
  { "_all", function(s) return num(s, "t_all") end },
  { "W n", function(s) return num(s, "workers") end },
  { "W rss max", function(s) return num(s, "w_rss_max") end },
  { "W fd max", function(s) return num(s, "w_fd_max") end },
  { "L rss kB", function(s) return num(s, "l_rss") end },
  { "L fd", function(s) return num(s, "l_fd") end },
  { "L heap kB", function(s) return string.format("%.0f", num(s, "load_heap_kb")) end },
}
local rows, widths = {}, {}
for i, c in ipairs(cols) do widths[i] = #c[1] end
for _, s in ipairs(samples) do
  local r = {}
  for i, c in ipairs(cols) do
    r[i] = tostring(c[2](s) or "")
    if #r[i] > widths[i] then widths[i] = #r[i] end
  end
  rows[#rows + 1] = r
end
local function line(r)
  local out = {}
  for i, v in ipairs(r) do out[i] = string.rep(" ", widths[i] - #v) .. v end
  return table.concat(out, "  ")
end
local head = {}
for i, c in ipairs(cols) do head[i] = c[1] end
print(title .. ": samples (Q: quiet, only the supervised workers left and nothing in flight; R: under load;")
print("  M: master, W: the workers alive then, L: the load process; rss in kB from VmRSS; heap after a full collect;")
print("  cache: freed blocks the master's block cache holds for reuse, part of its rss)")
print(line(head))
for _, r in ipairs(rows) do print(line(r)) end

-- the verdicts
local quiet = {}
for _, s in ipairs(samples) do if s.tag == "Q" then quiet[#quiet + 1] = s end end
local first, last, basis
if #quiet >= 2 then
  first, last = quiet[1], quiet[#quiet]
  basis = string.format("first quiet sample after the warm-up (t=%ss) -> last (t=%ss)", first.wall, last.wall)
else
  first, last = samples[math.min(2, #samples)], samples[#samples]
  basis = string.format("fewer than two quiet samples: sample at t=%ss -> last (t=%ss), under load", first.wall, last.wall)
end
local dworkers = num(last, "exited") - num(first, "exited")
local dconns = conns(last) - conns(first)
print()
print(string.format("%s: %s; in between: %d workers churned, %d connections, %d messages, %d handles passed, %d reloads, %d s",
  title, basis, dworkers, dconns, num(last, "msgs") - num(first, "msgs"), handles(last) - handles(first),
  num(last, "reloads") - num(first, "reloads"), num(last, "wall") - num(first, "wall")))

local function pct(p, floor) return function(v) return math.max(floor, math.abs(v) * p) end end
local function exact() return 0 end
local METRICS = {
  { "master VmRSS kB", "m_rss", pct(0.05, 1024), "max(1 MiB, 5%)" },
  { "master malloc in use kB", "m_malloc_nc", pct(0.05, 256), "max(256 KiB, 5%)", optional = "malloc_in_use" },
  { "master fds", "m_fd", exact, "exact" },
  { "master Lua heap kB", "heap_kb", pct(0.05, 64), "max(64 KiB, 5%)" },
  { "master cluster._all", "t_all", exact, "exact" },
  { "workers' max VmRSS kB", "w_rss_max", pct(0.10, 1024), "max(1 MiB, 10%)" },
  { "workers' max fds", "w_fd_max", exact, "exact" },
  { "load VmRSS kB", "l_rss", pct(0.05, 1024), "max(1 MiB, 5%)" },
  { "load fds", "l_fd", exact, "exact" },
  { "load Lua heap kB", "load_heap_kb", pct(0.05, 64), "max(64 KiB, 5%)" },
}
-- the least-squares slope of a metric against workers churned over the quiet samples
-- (per 1000 workers), when there are three or more: a steady leak shows as a steady
-- slope, a one-off step or the allocator filling up does not
local function trend(key)
  if #quiet < 3 then return nil end
  local n, sx, sy, sxx, sxy = 0, 0, 0, 0, 0
  for _, q in ipairs(quiet) do
    local x, y = num(q, "exited"), tonumber(q[key])
    if y == nil then return nil end
    n, sx, sy, sxx, sxy = n + 1, sx + x, sy + y, sxx + x * x, sxy + x * y
  end
  local var = n * sxx - sx * sx
  if var <= 0 then return nil end
  return (n * sxy - sx * sy) / var * 1000
end

if tonumber(first.cache_cycles) == 0 then
  print("  note: the master's block cache had not yet given its blocks back at the first sample compared: its RSS")
  print("  growth includes the cache filling up to 4 MB (malloc in use, less the cache, says whether live memory grew)")
end
local growing = 0
print(string.format("  %-25s %12s %12s %10s  %-16s %14s  %s", "metric", "start", "end", "growth", "tolerance",
  "trend/1000 W", "verdict"))
for _, m in ipairs(METRICS) do
  if m.optional and not (first[m.optional] and last[m.optional]) then goto continue end
  local a, b = num(first, m[2]), num(last, m[2])
  local d = b - a
  local tol = m[3](a)
  local verdict
  if d > tol then
    growing = growing + 1
    verdict = string.format("GROWING: %+.1f per 1000 workers, %+.2f per 1000 connections",
      dworkers > 0 and d / dworkers * 1000 or 0 / 0, dconns > 0 and d / dconns * 1000 or 0 / 0)
  elseif d < -tol then
    verdict = "flat (fell)"
  else
    verdict = "flat"
  end
  local fmt = function(v) return (math.type(v) == "integer" or v == math.floor(v)) and string.format("%d", v) or string.format("%.1f", v) end
  local tr = trend(m[2])
  print(string.format("  %-25s %12s %12s %10s  %-16s %14s  %s", m[1], fmt(a), fmt(b), (d >= 0 and "+" or "") .. fmt(d), m[4],
    tr and string.format("%+.1f", tr) or "-", verdict))
  ::continue::
end
print(string.format("  incidents over the whole run: client connections given up (no answer in time) %s; client errors %s;",
  tostring(last.load_timeouts), tostring(last.load_errors)))
print(string.format("  churn workers stuck (SIGKILLed by the master after SOAK_STUCK_MS) %d; handle exchanges failed %d;",
  num(last, "stuck"), num(last, "handle_fails")))
print(string.format("  reloads failed %d; master client errors %d; Worker 'error's %d; UDP answered %s of %s",
  num(last, "reload_fails"), num(last, "master_conn_errs"), num(last, "worker_errors"),
  tostring(last.load_udp_answered), tostring(last.load_udp_sent)))
print(string.format("%s: %s", title, growing == 0 and "no metric grew past its tolerance" or (growing .. " metric(s) GROWING")))
