--! Tollgate's lease script: a batch of operations on concurrency pools,
--! each atomic on its own, in order, at one instant of Redis's own clock.
--! The rules are `src/store/lease.rs`'s; the embedded store applies the
--! same ones.
--
-- Per operation i (1-based), two keys and seven arguments:
-- KEYS[2i-1]  the pool: a sorted set, member = lease id, score = its expiry
--             in microseconds of Redis's clock.
-- KEYS[2i]    the pool's weights: a hash, lease id -> weight, and the field
--             '' (no lease id is empty) -> the sum of the live weights.
--             Both keys carry the same hash tag as the scope's buckets; on
--             Cluster the caller sends only keys of one hash slot in one
--             call.
-- ARGV[7i-6]  op: 'a' acquire, 'r' renew, 'l' release
-- ARGV[7i-5]  the lease id (a member, never a key: it addresses nothing else)
-- ARGV[7i-4]  acquire: the limit, the most weight live at once, >= 1
-- ARGV[7i-3]  acquire: this lease's weight, 1..limit
-- ARGV[7i-2]  acquire: the weight the request must leave free (headroom)
-- ARGV[7i-1]  acquire, renew: time to live, microseconds, >= 1
-- ARGV[7i]    acquire: 1 for a dry run (judge, record nothing), else 0
--
-- Returns {now, then per operation: ok, expires_at, in_flight, earliest,
-- expired}: ok 1 or 0, or -1 when one of its keys holds another type (that
-- operation changed nothing and fails alone); the lease's expiry (0 unless
-- ok for acquire or renew); the live weight after the call; for a refused
-- acquire whose weight could ever fit, the earliest expiry of a live lease,
-- else -1; and how many expired leases this operation removed (never
-- released: the leak signal). Errors about the node (READONLY, OOM) fail
-- the whole call.
--
-- Clock: "now" is Redis's TIME in microseconds, read once for the batch. A
-- lease is live while now < expiry. Every lease expired at now is removed
-- (and its weight taken from the sum) before anything is counted, inside
-- this script, so a lease never outlives its expiry and no count sees a
-- dead one. Operations later in a batch see the earlier ones' writes, as if
-- they had all arrived at once. Both keys expire with the latest live
-- lease, so an abandoned pool costs nothing after it.
--
-- Numbers pass to Redis through string.format('%d'): Lua's own conversion
-- prints 14 significant digits, and microsecond instants have 16.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function int(n)
  return string.format('%d', n)
end

-- Drop every lease expired at now, with its weight, in chunks: a pool may
-- hold 10,000 leases that all expired together, and Lua's unpack has a
-- limit on the values it hands over at once (a guard: a test removing
-- 9,000 at once passed without it on Redis 7.0). Returns how many.
local CHUNK = 500
local function expire(pool, weights)
  local expired = redis.call('ZRANGEBYSCORE', pool, '-inf', int(now))
  if #expired == 0 then
    return 0
  end
  local gone = 0
  for first = 1, #expired, CHUNK do
    local last = math.min(first + CHUNK - 1, #expired)
    local ws = redis.call('HMGET', weights, unpack(expired, first, last))
    for i = 1, #ws do
      gone = gone + (tonumber(ws[i]) or 0)
    end
    redis.call('HDEL', weights, unpack(expired, first, last))
  end
  redis.call('ZREMRANGEBYSCORE', pool, '-inf', int(now))
  if gone > 0 then
    redis.call('HINCRBY', weights, '', int(-gone))
  end
  return #expired
end

-- One operation; `a` is the index of its first argument.
local function one(pool, weights, a)
  local op, id = ARGV[a], ARGV[a + 1]
  local expired = expire(pool, weights)
  local in_flight = tonumber(redis.call('HGET', weights, '') or '0')
  local held = redis.call('ZSCORE', pool, id)
  local ok, at, earliest = 0, 0, -1

  if op == 'a' then
    local limit, weight, reserve = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
    if held then
      ok, at = 1, tonumber(held)
    elseif in_flight + weight + reserve <= limit then
      ok, at = 1, now + tonumber(ARGV[a + 5])
      if ARGV[a + 6] ~= '1' then
        redis.call('ZADD', pool, int(at), id)
        redis.call('HSET', weights, id, int(weight))
        in_flight = redis.call('HINCRBY', weights, '', int(weight))
      end
    elseif weight + reserve <= limit then
      local first = redis.call('ZRANGE', pool, 0, 0, 'WITHSCORES')
      if #first == 2 then
        earliest = tonumber(first[2])
      end
    end
  elseif op == 'r' then
    if held then
      ok, at = 1, now + tonumber(ARGV[a + 5])
      redis.call('ZADD', pool, int(at), id)
    end
  elseif op == 'l' then
    if held then
      ok = 1
      local w = tonumber(redis.call('HGET', weights, id) or '0')
      redis.call('ZREM', pool, id)
      redis.call('HDEL', weights, id)
      in_flight = redis.call('HINCRBY', weights, '', int(-w))
    end
  end

  -- Keep both keys exactly as long as the latest live lease.
  local last = redis.call('ZRANGE', pool, -1, -1, 'WITHSCORES')
  if #last == 2 then
    local ms = math.ceil((tonumber(last[2]) - now) / 1000)
    redis.call('PEXPIRE', pool, int(ms))
    redis.call('PEXPIRE', weights, int(ms))
  else
    redis.call('DEL', pool, weights)
    in_flight = 0
  end
  return {ok, at, in_flight, earliest, expired}
end

-- A key of another type fails its own operation, before it wrote anything
-- (each operation reads both keys before its first write); any other error
-- is about the node and fails the call.
local out = {now}
for i = 1, #KEYS / 2 do
  local done, r = pcall(one, KEYS[2 * i - 1], KEYS[2 * i], 7 * i - 6)
  if not done then
    local msg = type(r) == 'table' and r.err or tostring(r)
    if not string.find(msg or '', 'WRONGTYPE') then
      error(r)
    end
    r = {-1, 0, 0, -1, 0}
  end
  for j = 1, 5 do
    out[#out + 1] = r[j]
  end
end
return out
