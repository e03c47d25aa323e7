--! Tollgate's lease script: one operation on one concurrency pool, atomic,
--! at one instant of Redis's own clock. The rules are `src/store/lease.rs`'s;
--! the embedded store applies the same ones.
--
-- KEYS[1]  the pool: a sorted set, member = lease id, score = its expiry in
--          microseconds of Redis's clock.
-- KEYS[2]  the pool's weights: a hash, lease id -> weight, and the field ''
--          (no lease id is empty) -> the sum of the live weights.
--          Both keys carry the same hash tag as the scope's buckets.
-- ARGV[1]  op: 'a' acquire, 'r' renew, 'l' release
-- ARGV[2]  the lease id (a member, never a key: it addresses nothing else)
-- ARGV[3]  acquire: the limit, the most weight live at once, >= 1
-- ARGV[4]  acquire: this lease's weight, 1..limit
-- ARGV[5]  acquire: the weight the request must leave free (headroom)
-- ARGV[6]  acquire, renew: time to live, microseconds, >= 1
-- ARGV[7]  acquire: 1 for a dry run (judge, record nothing), else 0
--
-- Returns {ok, expires_at, in_flight, earliest, now, expired}: ok 1 or 0; the
-- lease's expiry (0 unless ok for acquire or renew); the live weight after
-- the call; for a refused acquire whose weight could ever fit, the earliest
-- expiry of a live lease, else -1; now; and how many expired leases this
-- call removed (never released: the leak signal).
--
-- Clock: "now" is Redis's TIME in microseconds, read once. A lease is live
-- while now < expiry. Every lease expired at now is removed (and its
-- weight taken from the sum) before anything is counted, inside this
-- script, so a lease never outlives its expiry and no count sees a dead
-- one. Both keys expire with the latest live lease, so an abandoned pool
-- costs nothing after it.
--
-- Numbers pass to Redis through string.format('%d'): Lua's own conversion
-- prints 14 significant digits, and microsecond instants have 16.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local pool, weights = KEYS[1], KEYS[2]
local op, id = ARGV[1], ARGV[2]

local function int(n)
  return string.format('%d', n)
end

-- Drop every lease expired at now, with its weight, in chunks: a pool may
-- hold 10,000 leases that all expired together, and Lua's unpack has a
-- limit on the values it hands over at once (a guard: a test removing
-- 9,000 at once passed without it on Redis 7.0).
local CHUNK = 500
local expired = redis.call('ZRANGEBYSCORE', pool, '-inf', int(now))
if #expired > 0 then
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
end

local in_flight = tonumber(redis.call('HGET', weights, '') or '0')
local held = redis.call('ZSCORE', pool, id)
local ok, at, earliest = 0, 0, -1

if op == 'a' then
  local limit, weight, reserve = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
  if held then
    ok, at = 1, tonumber(held)
  elseif in_flight + weight + reserve <= limit then
    ok, at = 1, now + tonumber(ARGV[6])
    if ARGV[7] ~= '1' then
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
    ok, at = 1, now + tonumber(ARGV[6])
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

return {ok, at, in_flight, earliest, now, #expired}
