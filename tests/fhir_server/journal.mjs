// Opt-in persistence for the fault tests (env DATA_FILE): "the server was killed and came back with
// its data", as a HAPI JPA server on a database does. Off by default: the server stays in memory.
//
// Every committed write is appended to DATA_FILE as one JSON line before the answer is sent: an array
// with each new version (`put`) or delete (`deleted`) it made, so a transaction is one line, all or
// nothing. One write(2) per line: a kill -9 leaves whole lines (the page cache keeps them; no fsync,
// so a power cut may not). At start the lines are replayed into the repository as they were: same ids,
// versions, lastUpdated. A torn last line (killed mid-write) is skipped and cut off.
import fs from 'node:fs';

export class Journal {
  constructor(path) {
    this.fd = fs.openSync(path, 'a');
  }

  append(lines) {
    if (lines.length) fs.writeSync(this.fd, `[${lines.join(',')}]\n`);
  }
}

function* commits(path) {
  if (!fs.existsSync(path)) return;
  const lines = fs.readFileSync(path, 'utf8').split('\n').filter(Boolean);
  for (const [i, line] of lines.entries()) {
    try {
      yield JSON.parse(line);
    } catch (error) {
      if (i < lines.length - 1) throw new Error(`${path} line ${i + 1} is damaged: ${error.message}`);
    }
  }
}

// Cuts a torn last line off, so the next commit starts a line of its own instead of being glued to it
// (and then skipped, as part of a damaged line, at the next start).
function dropTornEnd(path) {
  if (!fs.existsSync(path)) return;
  const text = fs.readFileSync(path);
  if (text.length && text[text.length - 1] !== 0x0a) fs.truncateSync(path, text.lastIndexOf(0x0a) + 1);
}

// Replays what DATA_FILE holds into `repo`, then journals every commit from now on.
export function persist(repo, path) {
  for (const commit of commits(path)) {
    for (const entry of commit) repo.restore(entry);
  }
  dropTornEnd(path);
  repo.persist = new Journal(path);
}
