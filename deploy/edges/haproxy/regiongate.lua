-- Regiongate's decision for HAProxy: an http-request action that asks the decision service
-- (Regiongate's --authz-port, the /authz/haproxy/ contract) about each request, then either
-- answers the client with Regiongate's refusal (its status, headers and OpenAI-shaped body) or
-- lets the request go on with Regiongate's x-regiongate-* facts set on it.
--
--   lua-load /etc/haproxy/regiongate.lua
--   ...
--   option http-buffer-request                        # so that the model can be read from the body
--   http-request lua.regiongate http://127.0.0.1:9001 closed
--
-- The client is HAProxy's own `src` (the TCP peer it saw, or the address a PROXY protocol
-- header gave it from a load balancer it accepts that from), sent as the only X-Forwarded-For
-- hop: nothing the client wrote is read. Every x-regiongate-* header the client sent is
-- removed before Regiongate's are set, so the upstream sees only Regiongate's.
--
-- When Regiongate cannot be asked (down, slow past the 1 s timeout, an answer that does not name
-- Regiongate's policy), the second argument
-- decides: `closed` answers 503 (OpenAI-shaped); `open` lets the request through unjudged, with
-- x-regiongate-decision: unavailable.

local FACTS = "^x%-regiongate%-"
local UNAVAILABLE = '{"error":{"message":"The region check is unavailable; try again later.",'
  .. '"type":"server_error","param":null,"code":"authz_unavailable"}}'

local function strip_facts(http)
  for name, _ in pairs(http:req_get_headers()) do
    if string.find(name, FACTS) then
      http:req_del_header(name)
    end
  end
end

local function refuse(txn, status, headers, body)
  local reply = txn:reply()
  reply:set_status(status)
  for name, values in pairs(headers) do
    local lower = string.lower(name)
    if lower ~= "content-length" and lower ~= "connection" and lower ~= "transfer-encoding" then
      for _, value in pairs(values) do
        reply:add_header(lower, value)
      end
    end
  end
  reply:set_body(body)
  txn:done(reply)
end

local function decide(txn, service, failure)
  local http = txn.http
  local headers = {
    ["x-forwarded-for"] = { txn.sf:src() },
    ["x-forwarded-method"] = { txn.sf:method() },
    ["x-forwarded-uri"] = { txn.sf:pathq() },
  }
  local ctype = txn.sf:req_hdr("content-type")
  if ctype ~= nil and ctype ~= "" then
    headers["content-type"] = { ctype }
  end
  local body = txn.sf:req_body()  -- the whole body with `option http-buffer-request`; "" without one
  local response = core.httpclient():post({
    url = service .. "/authz/haproxy/",
    headers = headers,
    body = body or "",
    timeout = 1000,
  })
  strip_facts(http)
  local status = response and tonumber(response.status) or 0
  -- Every answer of Regiongate's names its policy; one without it is the HTTP client's own
  -- (a 504 on its timeout, a 503 when it cannot connect), not a decision.
  local answered = response and response.headers and response.headers["x-regiongate-policy"] ~= nil
  if not answered or status < 200 or status >= 600 then
    if failure == "open" then
      http:req_set_header("x-regiongate-decision", "unavailable")
      return
    end
    refuse(txn, 503, { ["content-type"] = { "application/json" } }, UNAVAILABLE)
    return
  end
  if status >= 200 and status < 300 then
    for name, values in pairs(response.headers or {}) do
      local lower = string.lower(name)
      if string.find(lower, FACTS) then
        http:req_set_header(lower, values[0] or values[1])
      end
    end
    return
  end
  refuse(txn, status, response.headers or {}, response.body or "")
end

core.register_action("regiongate", { "http-req" }, function(txn, service, failure)
  decide(txn, service, failure or "closed")
end, 2)
