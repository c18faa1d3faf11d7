-- Settings and what a worker inherits: setupMaster/'setup', fork(env), the worker marker,
-- module paths, cwd, silent, execArgv, args. Node's test-cluster-setup-primary,
-- -setup-primary-cumulative, -setup-primary-multiple, -fork-env, -cwd.
local cluster = require "cluster"
local core = require "cluster.core"
local H = require "helper"

local WORKER = H.fixture("worker.lua")

-- Forks a worker in FIXTURE_MODE=info and returns the facts it reports.
local function worker_info(env)
  env = env or {}
  env.FIXTURE_MODE = "info"
  local w = cluster.fork(env)
  local info
  w:once("message", function(m) info = m; w:kill() end)
  assert.is_true(H.wait_until(function() return info ~= nil end, 5000), "the worker did not report")
  return info, w
end

describe("cluster settings", function()
  before_each(H.setup)
  after_each(H.teardown)

  -- first in the file: nothing has called setupMaster yet
  it("setup-primary-cumulative (Node test-cluster-setup-primary-cumulative): settings start empty, get defaults, then accumulate", function()
    assert.same({}, cluster.settings)
    cluster.setupMaster()
    local s = cluster.settings
    -- exec defaults to the running script, made absolute
    assert.equal(arg[0]:sub(1, 1) == "/" and arg[0] or core.cwd() .. "/" .. arg[0], s.exec)
    assert.is_false(s.silent)
    local args = {}
    for i = 1, #arg do args[i] = arg[i] end
    assert.same(args, s.args)
    assert.same({}, s.execArgv)
    assert.equal("string", type(s.execPath))

    cluster.setupMaster({ exec = "overridden" })
    assert.equal(core.cwd() .. "/overridden", cluster.settings.exec)
    cluster.setupMaster({ args = { "foo", "bar" } })
    assert.equal(core.cwd() .. "/overridden", cluster.settings.exec)
    assert.same({ "foo", "bar" }, cluster.settings.args)
    cluster.setupMaster({ execArgv = { "baz", "bang" } })
    assert.equal(core.cwd() .. "/overridden", cluster.settings.exec)
    assert.same({ "foo", "bar" }, cluster.settings.args)
    assert.same({ "baz", "bang" }, cluster.settings.execArgv)
    cluster.setupMaster()
    assert.same({ "foo", "bar" }, cluster.settings.args)
    assert.same({ "baz", "bang" }, cluster.settings.execArgv)
    assert.is_false(cluster.settings.silent)
    -- back to something that runs, for the specs below
    cluster.setupMaster({ exec = WORKER, args = {}, execArgv = {} })
    H.run_for(20)   -- let the 'setup' events of this spec pass
    H.finish()
  end)

  it("setup-primary-multiple (Node test-cluster-setup-primary-multiple): 'setup' fires once per setupMaster call, later, with that call's settings", function()
    local configs = {}
    cluster.on("setup", function(settings) configs[#configs + 1] = settings.exec end)
    local execs = { "/x/next", "/x/next-2", "/x/next-3" }
    for _, e in ipairs(execs) do cluster.setupMaster({ exec = e }) end
    assert.equal(0, #configs)          -- asynchronous: not inside the call
    assert.is_true(H.wait_until(function() return #configs == 3 end, 2000))
    H.run_for(20)
    assert.same(execs, configs)
    cluster.setupPrimary({ exec = WORKER })   -- the alias fires 'setup' too
    assert.is_true(H.wait_until(function() return #configs == 4 end, 2000))
    assert.equal(WORKER, configs[4])
    H.finish()
  end)

  it("setup-primary (Node test-cluster-setup-primary): args and silent reach every worker; 'setup' sees the settings", function()
    local seen
    cluster.once("setup", H.expect(function()
      seen = cluster.settings
    end))
    cluster.setupPrimary({ exec = WORKER, args = { "custom argument" }, silent = true })
    local got = 0
    cluster.on("online", H.expect(function(w)
      w:once("message", function(info)
        if info.args[1] == "custom argument" then got = got + 1 end
        w:kill()
      end)
    end, 2))
    cluster.fork({ FIXTURE_MODE = "info" })
    cluster.fork({ FIXTURE_MODE = "info" })
    assert.is_true(H.wait_until(function() return got == 2 end, 5000))
    assert.equal("custom argument", seen.args[1])
    assert.is_true(seen.silent)
    assert.equal(WORKER, seen.exec)
    H.finish()
    cluster.setupMaster({ args = {}, silent = false })
  end)

  it("applies settings only to later forks: earlier workers keep theirs, later ones get the new ones", function()
    cluster.setupMaster({ exec = WORKER, args = { "first" } })
    local w1 = cluster.fork()
    cluster.setupMaster({ args = { "second", "two" } })
    local w2 = cluster.fork()
    local infos = {}
    for _, w in ipairs { w1, w2 } do
      w:on("message", function(m) infos[w.id] = m; w:kill() end)
      w:send({ cmd = "info" })
    end
    assert.is_true(H.wait_until(function() return infos[w1.id] and infos[w2.id] end, 5000))
    assert.same({ "first" }, infos[w1.id].args)
    assert.same({ "second", "two" }, infos[w2.id].args)
    -- cluster.settings is a copy: changing it does not change what the next fork uses
    cluster.settings.args = { "tampered" }
    local info = worker_info()
    assert.same({ "second", "two" }, info.args)
    cluster.setupMaster({ args = {} })
    H.finish()
  end)

  it("fork-env (Node test-cluster-fork-env): fork(env) merges over the master's environment and values become strings", function()
    cluster.setupMaster({ exec = WORKER })
    core.setenv("cluster_test_overwrite", "old")
    core.setenv("cluster_test_kept", "kept")
    local w = cluster.fork({ cluster_test_prop = "custom", cluster_test_overwrite = "new",
                             cluster_test_num = 42, cluster_test_float = 1.5, cluster_test_bool = true })
    local got = {}
    w:on("message", function(m) got[m.name] = m.value or false end)
    for _, name in ipairs { "cluster_test_prop", "cluster_test_overwrite", "cluster_test_kept",
                            "cluster_test_num", "cluster_test_float", "cluster_test_bool" } do
      w:send({ cmd = "getenv", name = name })
    end
    assert.is_true(H.wait_until(function() return got.cluster_test_bool ~= nil end, 5000))
    core.setenv("cluster_test_overwrite", nil)
    core.setenv("cluster_test_kept", nil)
    assert.equal("custom", got.cluster_test_prop)
    assert.equal("new", got.cluster_test_overwrite)
    assert.equal("kept", got.cluster_test_kept)
    assert.equal("42", got.cluster_test_num)
    assert.equal("1.5", got.cluster_test_float)
    assert.equal("true", got.cluster_test_bool)
    w:kill()
    H.finish()
  end)

  it("unsets the worker marker variable inside the worker, so the worker's own children are masters", function()
    cluster.setupMaster({ exec = WORKER })
    local info, w = worker_info()
    assert.is_true(info.isWorker)
    assert.is_false(info.isMaster)
    assert.is_nil(info.marker)
    assert.equal(w.id, info.id)

    local w2 = cluster.fork()
    local role
    w2:on("message", function(m) role = m.child_isMaster; w2:kill() end)
    w2:send({ cmd = "child_role" })
    assert.is_true(H.wait_until(function() return role ~= nil end, 5000))
    assert.equal("true", role)
    H.finish()
  end)

  it("passes the master's package.path and package.cpath to the worker", function()
    cluster.setupMaster({ exec = WORKER })
    local info = worker_info()
    assert.equal(package.path, info.path)
    assert.equal(package.cpath, info.cpath)
    H.finish()
  end)

  it("lets LUA_PATH / LUA_CPATH given to fork(env) override the master's module paths", function()
    cluster.setupMaster({ exec = WORKER })
    local root = H.ROOT
    local path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;/nonexistent/custom/?.lua"
    local info = worker_info({ LUA_PATH = path })
    assert.equal(path, info.path)
    local path54 = path .. ";/nonexistent/other/?.lua"
    info = worker_info({ LUA_PATH_5_4 = path54 })
    assert.equal(path54, info.path)
    local cpath = package.cpath .. ";/nonexistent/custom/?.so"
    info = worker_info({ LUA_CPATH = cpath })
    assert.equal(cpath, info.cpath)
    assert.equal(package.path, info.path)
    H.finish()
  end)

  it("cwd (Node test-cluster-cwd): a worker starts in the master's directory, or in settings.cwd once set", function()
    cluster.setupMaster({ exec = WORKER })
    assert.is_nil(cluster.settings.cwd)
    local info = worker_info()
    assert.equal(core.cwd(), info.cwd)
    cluster.setupMaster({ cwd = "/tmp" })
    assert.equal("/tmp", cluster.settings.cwd)
    info = worker_info()
    assert.equal("/tmp", info.cwd)
    cluster.setupMaster({ cwd = core.cwd() })
    H.finish()
  end)

  it("passes execArgv to the interpreter and args to the script", function()
    cluster.setupMaster({ exec = WORKER, execArgv = { "-e", "FIXTURE_W = 'from execArgv'" },
                          args = { "x", "y z", 3 } })
    local info = worker_info()
    assert.equal("from execArgv", info.W)
    assert.same({ "x", "y z", "3" }, info.args)
    assert.equal("-e", info.execArgv[1])
    assert.equal("FIXTURE_W = 'from execArgv'", info.execArgv[2])
    cluster.setupMaster({ execArgv = {}, args = {} })
    H.finish()
  end)

  it("uid and gid: the worker runs as that user and group (the master must be root)", function()
    local function ids(pid)
      local st = H.read_file("/proc/" .. pid .. "/status") or ""
      return tonumber(st:match("Uid:%s+(%d+)")), tonumber(st:match("Gid:%s+(%d+)"))
    end
    if ids("self") ~= 0 then
      pending("the master is not root")
      return
    end
    local where, why = H.for_nobody({ "worker.lua" })
    if not where then pending(why) return end
    cluster.setupMaster({ exec = where.fixture("worker.lua"), uid = 65534, gid = 65534 })
    local w = cluster.fork({ LUA_PATH = where.path, LUA_CPATH = where.cpath })
    cluster.setupMaster({ uid = 0, gid = 0 })   -- settings accumulate: back to root
    local uid, gid
    w:on("online", H.expect(function()
      uid, gid = ids(w.process.pid)
      w:kill()
    end))
    assert.is_true(H.wait_until(function() return w:isDead() end, 5000))
    assert.equal(65534, uid)
    assert.equal(65534, gid)
    H.finish()
  end)

  it("raises for a uid or gid outside uid_t (negative, or beyond 32 bits) instead of truncating it to another user", function()
    cluster.setupMaster({ exec = WORKER })
    local before = { uid = cluster.settings.uid, gid = cluster.settings.gid }
    for _, field in ipairs { "uid", "gid" } do
      for _, bad in ipairs { -1, 1 << 32, (1 << 32) + 1, math.maxinteger } do
        local ok, err = pcall(cluster.setupMaster, { [field] = bad })
        assert.is_false(ok, field .. " = " .. bad)
        assert.equal(("setupMaster: bad field '%s' in settings: expected an integer from 0 to 4294967294, got %d")
          :format(field, bad), err)
      end
    end
    assert.same(before, { uid = cluster.settings.uid, gid = cluster.settings.gid })
    H.run_for(20)   -- let the 'setup' event pass
    H.finish()
  end)

  it("names the function the user called in argument errors: setupPrimary as well as setupMaster", function()
    for _, name in ipairs { "setupMaster", "setupPrimary" } do
      local ok, err = pcall(cluster[name], { exec = 5 })
      assert.is_false(ok)
      assert.equal(name .. ": bad field 'exec' in settings: expected string, got number", err)
    end
    H.finish()
  end)

  it("silent: the worker's stdout and stderr do not reach the master's", function()
    local quiet = H.spawn_master(H.fixture("master_silent.lua"), { "silent" })
    local loud = H.spawn_master(H.fixture("master_silent.lua"), { "loud" })
    assert.is_true(H.wait_until(function()
      return H.master_status(quiet) ~= nil and H.master_status(loud) ~= nil
    end, 5000))
    assert.equal(0, H.master_status(quiet))
    assert.equal(0, H.master_status(loud))
    assert.equal("master-done 0\n", H.read_file(quiet.out))
    assert.equal("", H.read_file(quiet.err))
    local out = H.read_file(loud.out)
    assert.truthy(out:find("worker-output\n", 1, true))
    assert.truthy(out:find("master-done 0\n", 1, true))
    assert.equal("worker-output\n", H.read_file(loud.err))
    H.cleanup_master(quiet)
    H.cleanup_master(loud)
    H.finish()
  end)
end)
