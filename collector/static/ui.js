// gradwatch collector UI: the heat map's hover and sortable tables. No dependencies.
"use strict";

// float16 (little-endian bits) to a number.
function half(bits) {
  const sign = bits & 0x8000 ? -1 : 1, exponent = (bits >> 10) & 0x1f, fraction = bits & 0x3ff;
  if (exponent === 0) return sign * Math.pow(2, -14) * (fraction / 1024);
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * Math.pow(2, exponent - 15) * (1 + fraction / 1024);
}

function describe(value) {
  if (Number.isNaN(value)) return "NaN or Inf";
  if (value === -Infinity) return "no gradient";
  if (value === Infinity) return "not reported";
  return "norm " + Math.pow(10, value).toExponential(2);
}

for (const box of document.querySelectorAll(".heatmap")) {
  const data = JSON.parse(box.querySelector("script").textContent);
  const raw = atob(data.cells), steps = data.steps.length;
  const image = box.querySelector("img"), tip = box.querySelector(".tip");
  image.addEventListener("mousemove", (event) => {
    const rect = image.getBoundingClientRect();
    const col = Math.floor((event.clientX - rect.left) / data.cellWidth);
    const row = Math.floor((event.clientY - rect.top) / data.cellHeight);
    if (row < 0 || row >= data.names.length || col < 0 || col >= steps) { tip.hidden = true; return; }
    const at = 2 * (row * steps + col);
    const value = half(raw.charCodeAt(at) | (raw.charCodeAt(at + 1) << 8));
    tip.textContent = data.names[row] + " · step " + data.steps[col] + " · " + describe(value);
    tip.style.left = (event.clientX - rect.left + 14) + "px";
    tip.style.top = (event.clientY - rect.top + 10) + "px";
    tip.hidden = false;
  });
  image.addEventListener("mouseleave", () => { tip.hidden = true; });
}

for (const table of document.querySelectorAll("table.sortable")) {
  table.querySelectorAll("th").forEach((header, column) => {
    let ascending = false;
    header.addEventListener("click", () => {
      ascending = !ascending;
      const body = table.tBodies[0];
      const key = (row) => {
        const cell = row.cells[column];
        const number = parseFloat(cell.dataset.value ?? cell.textContent);
        return Number.isNaN(number) ? cell.textContent : number;
      };
      const rows = Array.from(body.rows).sort((a, b) => {
        const x = key(a), y = key(b);
        const order = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
        return ascending ? order : -order;
      });
      rows.forEach((row) => body.appendChild(row));
    });
  });
}
