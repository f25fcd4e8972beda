// termrelay's status page: polls status.json and draws it. Plain script, no build step.
// Text goes in with textContent only: problem messages carry what clients sent (addresses).
"use strict";

const previous = new Map(); // edge id -> {at_ms, frames_forwarded}, for frames/s
let refreshMs = 2000;

function byId(id) { return document.getElementById(id); }

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function when(ms) { return new Date(ms).toLocaleString(); }

function framesPerSecond(stats) {
  const before = previous.get(stats.edge_id);
  previous.set(stats.edge_id, { at_ms: stats.at_ms, frames: stats.frames_forwarded });
  if (!before || stats.at_ms <= before.at_ms || stats.frames_forwarded < before.frames) return null;
  return (stats.frames_forwarded - before.frames) * 1000 / (stats.at_ms - before.at_ms);
}

function edgeState(stats) {
  if (!stats) return ["not answering", "bad"];
  if (stats.draining) return ["draining", "warn"];
  if (!stats.ready) return ["not ready", "warn"];
  if (!stats.nats_server) return ["NATS away", "bad"];
  return ["serving", ""];
}

function draw(fleet) {
  refreshMs = fleet.refresh_ms;
  byId("answered-by").textContent = fleet.answered_by;
  byId("updated").textContent = when(fleet.at_ms);
  byId("refresh").textContent = (fleet.refresh_ms / 1000).toString();

  let mac = 0, ios = 0, unknown = 0, paired = 0, rate = 0, rateKnown = false, storageErrors = 0;
  const edgeRows = byId("edge-rows");
  const rows = [];
  for (const entry of fleet.edges) {
    const stats = entry.stats;
    const row = document.createElement("tr");
    row.dataset.edgeId = entry.edge_id;
    const [state, stateClass] = edgeState(stats);
    cell(row, entry.edge_id);
    cell(row, state, stateClass);
    if (stats) {
      mac += stats.sockets.mac; ios += stats.sockets.ios; unknown += stats.sockets.unknown;
      paired += stats.paired_rooms; storageErrors += stats.storage_errors;
      const perSecond = framesPerSecond(stats);
      if (perSecond !== null) { rate += perSecond; rateKnown = true; }
      cell(row, stats.sockets.mac, "num");
      cell(row, stats.sockets.ios, "num");
      cell(row, stats.sockets.unknown, "num");
      cell(row, stats.paired_rooms, "num");
      cell(row, perSecond === null ? "…" : perSecond.toFixed(1), "num");
      cell(row, stats.frames_forwarded, "num").id = `frames-${entry.edge_id}`;
      cell(row, stats.frames_undelivered, "num");
      cell(row, stats.storage_errors, stats.storage_errors ? "num bad" : "num");
      cell(row, stats.nats_server || "disconnected", stats.nats_server ? "" : "bad");
      cell(row, stats.nats_reconnects, "num");
      cell(row, when(stats.started_at_ms));
    } else {
      for (let i = 0; i < 11; i++) cell(row, "?", "num");
    }
    rows.push(row);
  }
  edgeRows.replaceChildren(...rows);

  byId("edges-alive").textContent = fleet.edges.length;
  byId("sockets-total").textContent = mac + ios + unknown;
  byId("sockets-mac").textContent = mac;
  byId("sockets-ios").textContent = ios;
  byId("paired-rooms").textContent = paired;
  byId("frames-per-s").textContent = rateKnown ? rate.toFixed(1) : "…";
  byId("storage-errors").textContent = storageErrors;

  let lag = 0;
  const meteringRows = fleet.metering.map((m) => {
    const row = document.createElement("tr");
    lag += m.usage_pending;  // each counts the partitions it owns
    cell(row, m.process);
    cell(row, m.ready ? "consuming" : "not ready", m.ready ? "" : "warn");
    cell(row, m.usage_pending, m.usage_pending > 100 ? "num warn" : "num");
    cell(row, (m.partitions || []).join(" ") || "none");
    cell(row, m.batches_applied, "num");
    cell(row, m.ledger_updates, "num");
    cell(row, when(m.started_at_ms));
    return row;
  });
  byId("metering-rows").replaceChildren(...meteringRows);
  const lagCell = byId("metering-lag");
  lagCell.textContent = fleet.metering.length ? lag : "no metering answers";
  lagCell.className = fleet.metering.length ? "value" : "value bad";

  const problemRows = fleet.problems.map((p) => {
    const row = document.createElement("tr");
    cell(row, when(p.at_ms));
    cell(row, p.source);
    cell(row, p.level, p.level === "WARNING" ? "warn" : "bad");
    cell(row, p.logger);
    cell(row, p.message);
    return row;
  });
  byId("problem-rows").replaceChildren(...problemRows);
}

function trouble(text) {
  const box = byId("trouble");
  box.textContent = text;
  box.style.display = text ? "block" : "none";
}

async function refresh() {
  try {
    const response = await fetch("status.json", { cache: "no-store", credentials: "same-origin" });
    if (!response.ok) {
      trouble(`The edge answered ${response.status}: ${(await response.text()).trim()}`);
    } else {
      draw(await response.json());
      trouble("");
    }
  } catch (err) {
    trouble(`Cannot reach the edge (${err.message}); trying again.`);
  }
  setTimeout(refresh, refreshMs);
}

refresh();
