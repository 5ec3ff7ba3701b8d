-- When an alarm nobody acknowledged in time was escalated to the parent court's hub.
ALTER TABLE alarms ADD COLUMN escalated_us BIGINT;
