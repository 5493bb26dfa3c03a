"""The stages a document passes through, in order: intake (inbox to queue), planner
(queue to batch files), submitter (upload and create), collector (poll and download),
outcome (the verdict on each request), delivery (outbox); the sync lane beside them;
retention; and supervise, the guard every unit of work runs in."""
