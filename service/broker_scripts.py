"""The broker's Lua scripts: the bounded enqueue and the lost-job check (API side), the
acknowledgement (worker side).

Each touches keys of one model version only, which share a hash tag (`service.broker_protocol.Keys`),
so each runs atomically on a single Redis and on a cluster.
"""

from __future__ import annotations

# KEYS[1] = job stream, KEYS[2] = its cost counter. ARGV = max_len, max_cost, n_jobs, cost, then
# per job: n_pairs, field1, value1, ... XLEN counts queued plus in-flight jobs (workers delete
# acknowledged entries), so the checks and the XADDs in one script make both bounds exact under any
# number of concurrent API replicas. An empty stream has no cost: resetting the counter then heals
# any drift (a Redis restarted without its data, an acknowledgement lost with a dying worker).
# Returns {1, length, cost, entry id per job} (the queue it leaves) or {0, length, cost} when a
# bound would be passed.
ENQUEUE_LUA = """
local len = redis.call('XLEN', KEYS[1])
local cost = 0
if len == 0 then
  redis.call('DEL', KEYS[2])
else
  cost = tonumber(redis.call('GET', KEYS[2]) or '0')
end
local n = tonumber(ARGV[3])
local add = tonumber(ARGV[4])
if len + n > tonumber(ARGV[1]) or cost + add > tonumber(ARGV[2]) then
  return {0, len, cost}
end
redis.call('INCRBY', KEYS[2], add)
local out = {1, len + n, cost + add}
local pos = 5
for i = 1, n do
  local pairs_n = tonumber(ARGV[pos])
  pos = pos + 1
  local args = {'XADD', KEYS[1], '*'}
  for j = 1, 2 * pairs_n do
    args[#args + 1] = ARGV[pos]
    pos = pos + 1
  end
  out[#out + 1] = redis.call(unpack(args))
end
return out
"""

# KEYS[1] = job stream, KEYS[2] = its cost counter. ARGV = group, then id1, cost1, id2, cost2, ...
# Only entries this call really deletes give their cost back, so a job acknowledged twice (run by a
# slow worker and by the one that reclaimed it) is not subtracted twice. XACK goes through pcall: after
# a failover the new primary may hold the stream without its consumer group (an enqueue recreated
# it), and a NOGROUP error would fail the round trip that also wrote the reply, so the worker would
# write the reply again and again until the deadline.
ACK_LUA = """
local freed = 0
for i = 2, #ARGV, 2 do
  redis.pcall('XACK', KEYS[1], ARGV[1], ARGV[i])
  freed = freed + redis.call('XDEL', KEYS[1], ARGV[i]) * tonumber(ARGV[i + 1])
end
if freed > 0 and redis.call('DECRBY', KEYS[2], freed) < 0 then
  redis.call('SET', KEYS[2], 0)
end
return freed
"""

# KEYS[1] = job stream, KEYS[2] = an API replica's reply stream. ARGV = group, then entry ids.
# Returns {newest reply id or '', then the 0-based index of each entry that no longer exists}. An
# entry delivered to a worker is found in the group's pending list, which holds no payload; only an
# entry still waiting for delivery is read (payload included, inside Redis). One script reads the
# entries and the newest reply id at one instant, so a reply written before its entry was deleted
# (workers reply, then acknowledge) is at or below that id.
AUDIT_LUA = """
local out = {''}
local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if #newest > 0 then
  out[1] = newest[1][1]
end
for i = 2, #ARGV do
  local pending = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  local found = type(pending) == 'table' and #pending > 0
  if not found then
    found = #redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i]) > 0
  end
  if not found then
    out[#out + 1] = i - 2
  end
end
return out
"""
