--! Tollgate's decision script: judge every bucket of one charge at one
--! instant of Redis's own clock, then take the cost from all of them or none.
--
-- KEYS[i]  the i-th bucket's key. Every key of one call shares one hash tag
--          (the scope), so the call runs on one Cluster slot.
-- ARGV[1]  the mode: "0" decide and take, "1" dry run (judge, take
--          nothing), "2" refund: give back `cost` to every bucket, undoing
--          an earlier take exactly (used when a Cluster charge spanning
--          slots reserved in one slot and was denied in another).
-- ARGV[2 + 4(i-1) .. 5 + 4(i-1)], for bucket i:
--          capacity  C, tokens, 1 ..= 50,000,000
--          period    P, microseconds for an empty bucket to refill, >= 1
--          cost      n, tokens to take, >= 1
--          shadow    "1" if this bucket never denies, else "0"
--
-- Clock: "now" is Redis's TIME in microseconds, never the caller's clock, so
-- every Tollgate replica shares one clock.
--
-- State: GCRA. A bucket's value is the string "ticks:frac", its theoretical
-- arrival time TAT = ticks + frac/C microseconds (0 <= frac < C): the moment
-- it is full again. An absent key is a full bucket. Taking n tokens moves the
-- TAT by n*P/C exactly; a bucket conforms when the new TAT is at most P
-- ahead of now. This mirrors src/bucket.rs, which is the reference.
--
-- Exactness: Lua 5.1 numbers are doubles, exact below 2^53. With P split as
-- q*C + r, n*P/C = n*q + n*r/C, where n*q <= P and n*r < C^2 < 2^53 (the
-- config caps C at 50,000,000), and now + P stays near 2^51, so every value
-- here is an exact integer and every floor() divides exactly.
--
-- Expiry: a taken bucket gets PEXPIRE (SET .. PX) = time until full, so a
-- refilled bucket vanishes and memory follows active buckets only. A denied
-- or dry-run charge writes nothing.
--
-- Returns {allowed, now, then per bucket i: conforms, ticks, frac}
-- (a refund answers allowed = conforms = 1):
--   allowed   1 when every non-shadow bucket held its cost, else 0
--   now       the decision's instant, microseconds since the Unix epoch
--   conforms  1 when bucket i held its cost
--   ticks, frac  bucket i's TAT after the decision (taken or not), never
--             earlier than now. The caller derives remaining, reset_after and
--             retry_after from it with 128-bit integers.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local dry = ARGV[1] == '1'
local n = #KEYS

-- Writes a bucket's state with its expiry, or forgets it when full.
local function store(key, ticks, frac)
  if ticks < now or (ticks == now and frac == 0) then
    redis.call('DEL', key)
    return
  end
  local until_full = ticks - now
  if frac > 0 then
    until_full = until_full + 1
  end
  redis.call('SET', key, string.format('%d:%d', ticks, frac),
    'PX', math.max(1, math.ceil(until_full / 1000)))
end

if ARGV[1] == '2' then
  local out = { 1, now }
  for i = 1, n do
    local a = 2 + (i - 1) * 4
    local cap = tonumber(ARGV[a])
    local period = tonumber(ARGV[a + 1])
    local cost = tonumber(ARGV[a + 2])
    local ticks, frac = now, 0
    local v = redis.call('GET', KEYS[i])
    local sep = v and string.find(v, ':', 1, true)
    if sep then
      local st = tonumber(string.sub(v, 1, sep - 1))
      local sf = tonumber(string.sub(v, sep + 1))
      if st and sf then
        -- TAT - cost*P/C, exactly: whole ticks, then borrow for the fraction.
        local q = math.floor(period / cap)
        local d = cost * (period - q * cap)
        st = st + math.floor(sf / cap) - cost * q
        sf = sf % cap
        if d > sf then
          local borrow = math.floor((d - sf + cap - 1) / cap)
          st = st - borrow
          sf = sf + borrow * cap
        end
        sf = sf - d
        store(KEYS[i], st, sf)
        if st > now or (st == now and sf > 0) then
          ticks, frac = st, sf
        end
      end
    end
    -- An absent bucket is full already: nothing to give back.
    out[#out + 1] = 1
    out[#out + 1] = ticks
    out[#out + 1] = frac
  end
  return out
end
local allowed = 1
local judged = {}

for i = 1, n do
  local a = 2 + (i - 1) * 4
  local cap = tonumber(ARGV[a])
  local period = tonumber(ARGV[a + 1])
  local cost = tonumber(ARGV[a + 2])
  local shadow = ARGV[a + 3] == '1'

  local ticks, frac = now, 0
  local v = redis.call('GET', KEYS[i])
  if v then
    local sep = string.find(v, ':', 1, true)
    if sep then
      local st = tonumber(string.sub(v, 1, sep - 1))
      local sf = tonumber(string.sub(v, sep + 1))
      if st and sf then
        -- A reload may have shrunk the capacity: carry whole ticks out of frac.
        st = st + math.floor(sf / cap)
        sf = sf % cap
        if st > now or (st == now and sf > 0) then
          ticks, frac = st, sf
        end
      end
    end
  end

  local conforms = false
  local nt, nf = ticks, frac
  if cost <= cap then
    local q = math.floor(period / cap)
    local f = frac + cost * (period - q * cap)
    nt = ticks + cost * q + math.floor(f / cap)
    nf = f % cap
    local limit = now + period
    conforms = nt < limit or (nt == limit and nf == 0)
  end
  if not conforms and not shadow then
    allowed = 0
  end
  judged[i] = { conforms, ticks, frac, nt, nf }
end

local out = { allowed, now }
for i = 1, n do
  local j = judged[i]
  local ticks, frac = j[2], j[3]
  if allowed == 1 and not dry and j[1] then
    ticks, frac = j[4], j[5]
    store(KEYS[i], ticks, frac)
  end
  out[#out + 1] = j[1] and 1 or 0
  out[#out + 1] = ticks
  out[#out + 1] = frac
end
return out
