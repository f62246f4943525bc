-- Argo CD health of a tuning.sftjob.dev/SFTJob, read from the status the operator writes.
-- The same text is the value of resource.customizations.health.tuning.sftjob.dev_SFTJob
-- in argocd-cm-patch.yaml (a test keeps the two identical). Lua 5.1, as Argo CD runs it.
local hs = {}

local function condition(kind)
  if obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function is_true(kind)
  local c = condition(kind)
  return c ~= nil and c.status == "True"
end

local function message(kind, fallback)
  local c = condition(kind)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

if obj.status == nil or obj.status.phase == nil and not is_true("Failed") then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator"
  return hs
end

local phase = obj.status.phase

-- A Failed condition wins over any phase: an invalid spec or a failed run.
if phase == "Failed" or is_true("Failed") then
  local fallback = "Failed"
  if obj.status.lastFailure ~= nil and obj.status.lastFailure.message ~= nil then
    fallback = obj.status.lastFailure.message
  end
  hs.status = "Degraded"
  hs.message = message("Failed", fallback)
elseif phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = message("Succeeded", "Succeeded")
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = message("Suspended", "Suspended")
elseif phase == "Running" or phase == "Pending" then
  hs.status = "Progressing"
  hs.message = message("Running", phase)
  local progress = obj.status.progress
  if phase == "Running" and progress ~= nil and progress.summary ~= nil then
    hs.message = hs.message .. "; step " .. progress.summary
  end
elseif phase == "Restarting" then
  hs.status = "Progressing"
  hs.message = message("Restarting", "Restarting")
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
end
return hs
