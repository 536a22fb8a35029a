// Jobs: start an evaluation (anyone) or a training (admins) with a form, watch their progress
// live, and read the results: evaluation figures with their standard errors, trained
// dictionaries with their metrics.

import { api, forget, models, session } from "./api.js";
import { busy, clear, clearErrors, field, fmt, formError, h, pct, pm, select, showError, viewError } from "./dom.js";
import { parseEdit, splitEdits, wireEdit } from "./editspec.js";

const POLL_MS = 1000;

function list(text, convert = Number) {
  return text.split(",").map((item) => item.trim()).filter(Boolean).map(convert);
}

export async function render(root, { segments }) {
  const admin = session.isAdmin;
  let stored = [];
  let served = [];
  try {
    [stored, served] = await Promise.all([
      api("GET", "v1/dictionaries?stored=true").then((r) => r.data), models(),
    ]);
  } catch (err) {
    return viewError(root, "Jobs", err);
  }
  const jobsTable = h("div", { class: "table-wrap", "data-testid": "jobs" });
  const detail = h("section", { class: "panel job-detail", "aria-label": "Job", "data-testid": "job-detail", hidden: true });
  clear(root, h("h2", { text: "Jobs" }),
    h("div", { class: "job-forms" }, evaluationForm(stored, started), admin ? trainingForm(served, started) : null),
    h("section", { class: "panel" }, h("h3", { text: "Recent jobs" }), jobsTable), detail);

  let selected = segments[1] || null;
  let timer = null;
  let stopped = false;

  function started(job) {
    selected = job.id;
    history.replaceState(null, "", `#/jobs/${job.id}`);
    poll();
  }

  async function poll() {
    clearTimeout(timer);
    let jobs = [];
    try {
      const kinds = admin ? ["evaluations", "trainings"] : ["evaluations"];
      const lists = await Promise.all(kinds.map((kind) => api("GET", `v1/${kind}`)));
      jobs = lists.flatMap((l) => l.data).sort((a, b) => b.created - a.created).slice(0, 30);
    } catch (err) {
      clear(jobsTable, h("p", { class: "form-error", role: "alert", text: err.describe() }));
      return;
    }
    if (stopped) return;
    clear(jobsTable, jobs.length ? h("table", {},
      h("thead", {}, h("tr", {}, ["Job", "Kind", "Status", "Progress", "Message", "Started"].map((t) => h("th", { scope: "col", text: t })))),
      h("tbody", {}, jobs.map((job) => h("tr", { "data-id": job.id, "data-status": job.status, class: job.id === selected ? "selected" : "" },
        h("td", {}, h("a", { href: `#/jobs/${job.id}`, text: job.id, onclick: (e) => { e.preventDefault(); started(job); } })),
        h("td", { text: job.kind }),
        h("td", {}, h("span", { class: `badge ${job.status}`, text: job.status })),
        h("td", {}, h("progress", { max: 1, value: job.progress, "aria-label": `${job.id} progress` }), ` ${Math.round(100 * job.progress)}%`),
        h("td", { text: job.error || job.message || "" }),
        h("td", { text: new Date(job.created * 1000).toLocaleTimeString() })))))
      : h("p", { class: "hint", text: "No jobs yet." }));
    const current = jobs.find((job) => job.id === selected);
    if (current) showJob(current);
    if (jobs.some((job) => job.status === "queued" || job.status === "running")) timer = setTimeout(poll, POLL_MS);
  }

  function showJob(job) {
    detail.hidden = false;
    detail.dataset.status = job.status;
    const cancel = ["queued", "running"].includes(job.status) ? h("button", {
      type: "button", class: "secondary small", text: "Cancel",
      onclick: async () => { await api("DELETE", `v1/${job.kind}s/${job.id}`).catch(() => null); poll(); },
    }) : null;
    clear(detail, h("h3", {}, `${job.kind} ${job.id} `, h("span", { class: `badge ${job.status}`, text: job.status }), " ", cancel),
      h("div", { class: "progress-line" }, h("progress", { max: 1, value: job.progress }),
        h("span", { class: "hint", role: "status", text: ` ${Math.round(100 * job.progress)}% · ${job.message || ""}` })),
      job.error ? h("p", { class: "form-error", role: "alert", text: job.error }) : null,
      job.result ? (job.kind === "evaluation" ? evaluationResult(job.result) : trainingResult(job.result)) : null);
    if (job.kind === "training" && job.status === "succeeded") forget("v1/");
  }

  poll();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

function evaluationForm(stored, onStarted) {
  const names = stored.map((d) => d.name);
  const dictionary = select(names, names[0]);
  const tokens = h("input", { type: "number", min: 128, step: 128, value: 32768 });
  const corpus = h("input", { type: "text", value: "builtin:pydocs/heldout", spellcheck: "false" });
  const edits = h("input", { type: "text", placeholder: "e.g. pythia-tiny-l2:7:scale:4 (comma-separated)", spellcheck: "false" });
  const button = h("button", { type: "submit", class: "primary", text: "Start evaluation" });
  const form = h("form", { class: "panel", "aria-label": "Start an evaluation", novalidate: true },
    h("h3", { text: "Evaluate a dictionary" }),
    h("p", { class: "hint", text: "CE and perplexity clean / spliced / zero-ablated / edited, KL, fvu, l0, dead "
      + "fraction, each with its standard error over windows." }),
    formError(),
    h("div", { class: "grid" }, field("Dictionary", dictionary, { param: "dictionary" }),
      field("Tokens", tokens, { param: "tokens" }), field("Corpus", corpus, { param: "corpus" }),
      field("Edits (optional)", edits, { param: "edits",
        hint: "DICT:FEATURE:OP[:VALUE][@POSITIONS][,unit=max][,when=D:F>T] or vector:NAME:VALUE[,unit=norm]" })),
    h("div", { class: "actions" }, button));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const parsed = splitEdits(edits.value).map(parseEdit);
    const bad = parsed.findIndex((item) => item.error);
    if (bad >= 0) {
      showError(form, { describe: () => `edits: item ${bad + 1}: ${parsed[bad].error}`, param: "edits" });
      return;
    }
    await start(form, button, onStarted, () => api("POST", "v1/evaluations", {
      dictionary: dictionary.value, tokens: tokens.value === "" ? undefined : Number(tokens.value),
      corpus: corpus.value, edits: parsed.map((item) => wireEdit(item.edit)),
    }));
  });
  return form;
}

function trainingForm(served, onStarted) {
  const name = h("input", { type: "text", placeholder: "l2-topk", spellcheck: "false", autocomplete: "off" });
  const model = select(served.map((m) => m.id), served[0]?.id);
  const hook = h("input", { type: "text", value: "blocks.2.hook_resid_post", spellcheck: "false" });
  const architecture = select(["topk", "relu", "jumprelu"], "topk");
  const dSae = h("input", { type: "text", value: "1024" });
  const k = h("input", { type: "text", value: "32" });
  const l1 = h("input", { type: "text", value: "1" });
  const targetL0 = h("input", { type: "text", placeholder: "e.g. 20,40", spellcheck: "false" });
  const tokens = h("input", { type: "number", min: 1024, step: 1024, value: 1000000 });
  const deploy = h("input", { type: "checkbox" });
  const button = h("button", { type: "submit", class: "primary", text: "Start training" });
  const form = h("form", { class: "panel", "aria-label": "Start a training", novalidate: true },
    h("h3", { text: "Train dictionaries (admin)" }),
    h("p", { class: "hint", text: "Comma-separated values train every combination in one pass (a sweep)." }),
    formError(),
    h("div", { class: "grid" }, field("Name", name, { param: "name" }), field("Model", model, { param: "model" }),
      field("Hook", hook, { param: "hook" }), field("Architecture", architecture, { param: "architecture" }),
      field("Features (d_sae)", dSae, { param: "d_sae" }), field("k (topk)", k, { param: "k" }),
      field("L1 / L0 coefficient", l1, { param: "l1" }),
      field("Target L0 (relu, jumprelu)", targetL0, { param: "target_l0",
        hint: "optional: the coefficient is steered during training to reach each L0" }),
      field("Tokens", tokens, { param: "tokens" }),
      field("Deploy when done", deploy, { param: "deploy", className: "inline" })),
    h("div", { class: "actions" }, button));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const targets = list(targetL0.value);
    await start(form, button, onStarted, () => api("POST", "v1/trainings", {
      name: name.value.trim(), model: model.value, hook: hook.value.trim(), architecture: architecture.value,
      d_sae: list(dSae.value), k: list(k.value),
      // with targets the coefficient starts from the server's default (weak) and is steered from there
      l1: targets.length ? undefined : list(l1.value), target_l0: targets.length ? targets : undefined,
      tokens: tokens.value === "" ? undefined : Number(tokens.value), deploy: deploy.checked,
    }));
  });
  return form;
}

/** Submit a job form: the button shows it is busy, the new job goes to onStarted, an error to the form. */
async function start(form, button, onStarted, send) {
  busy(button, true, "Starting…");
  try {
    onStarted(await send());
  } catch (err) {
    showError(form, err);
  } finally {
    busy(button, false);
  }
}

function evaluationResult(result) {
  const runs = ["clean", "spliced", "zero", "edited"];
  return h("div", { class: "results" },
    h("p", { class: "hint", text: `${result.dictionary} at ${result.hook}: ${result.tokens} tokens of ${result.corpus} `
      + `(${result.windows} windows of ${result.context_length}) · ${fmt(result.seconds, 1)} s` }),
    h("div", { class: "table-wrap" }, h("table", { "data-testid": "evaluation-ce" },
      h("thead", {}, h("tr", {}, ["Run", "CE (nats) ± se", "Perplexity"].map((t) => h("th", { scope: "col", text: t })))),
      h("tbody", {}, runs.map((run) => h("tr", { "data-run": run }, h("th", { scope: "row", text: run }),
        h("td", { class: "num", text: pm(result.ce[run]) }), h("td", { class: "num", text: fmt(result.ce[run].perplexity, 2) })))))),
    h("div", { class: "table-wrap" }, h("table", { "data-testid": "evaluation-figures" },
      h("thead", {}, h("tr", {}, ["Figure", "Mean ± se"].map((t) => h("th", { scope: "col", text: t })))),
      h("tbody", {},
        [["CE loss recovered", pm(result.ce_loss_recovered)], ["KL clean‖spliced", pm(result.kl.spliced)],
          ["KL clean‖edited", pm(result.kl.edited)], ["fvu", pm(result.fvu)], ["l0", pm(result.l0, 2)],
          ["dead fraction", `${pct(result.dead_fraction)} (over ${result.dead_window_tokens} tokens)`]]
          .map(([label, value]) => h("tr", {}, h("th", { scope: "row", text: label }), h("td", { class: "num", text: value })))))));
}

function trainingResult(result) {
  const keys = ["fvu", "l0", "dead_fraction", "final_train_fvu", "train_seconds"];
  return h("div", { class: "results" }, h("div", { class: "table-wrap" }, h("table", {},
    h("thead", {}, h("tr", {}, ["Dictionary", ...keys, "Deployed"].map((t) => h("th", { scope: "col", text: t })))),
    h("tbody", {}, result.dictionaries.map((entry) => {
      const deployment = (result.deployments || []).find((d) => d.dictionary === entry.name);
      return h("tr", {}, h("th", { scope: "row" }, h("a", { href: `#/features?dict=${encodeURIComponent(entry.name)}`, text: entry.name })),
        keys.map((key) => h("td", { class: "num", text: fmt(entry.metrics?.[key]) })),
        h("td", { text: deployment ? (deployment.deployed ? "yes" : `no: ${deployment.error || ""}`) : "—" }));
    })))));
}
