"""The genomics example (see Pipefile.py) as a plain hailtop.pipeline script.

Run it with `python hail_script.py` from this directory. The only line that differs from
the script a hailtop.pipeline user would have written is the import. p.run() uses the
same engine and cache as `pipebuild make`, so after one build it runs nothing.
"""

from pipebuild import Pipeline  # was: from hailtop.pipeline import Pipeline

CHROMS = ["chr20", "chr21", "chr22"]
MIN_QUAL = 30

# Keep the header; keep records of one chromosome with QUAL >= minq and FILTER == PASS.
# Writes one line "chrom  n_records  n_pass  n_fail" to the file named by `stats`.
FILTER_AWK = r"""
BEGIN { FS = OFS = "\t" }
/^#/ { print; next }
$1 == chrom {
    n++
    if ($6 != "." && $6 + 0 >= minq && $7 == "PASS") { print; kept++ }
}
END { printf("%s\t%d\t%d\t%d\n", chrom, n, kept, n - kept) > stats }
"""

# One line per sample: chrom, sample, genotypes called, heterozygous, homozygous alt.
COUNT_AWK = r"""
BEGIN { FS = OFS = "\t" }
/^##/ { next }
/^#CHROM/ { for (i = 10; i <= NF; i++) name[i] = $i; next }
{
    for (i = 10; i <= NF; i++) {
        split($i, f, ":"); gt = f[1]; gsub(/\|/, "/", gt)
        if (gt == "." || gt == "./.") continue
        called[i]++
        if (gt == "0/1" || gt == "1/0") het[i]++
        else if (gt == "1/1") hom[i]++
    }
}
END { for (i = 10; i in name; i++) print chrom, name[i], called[i] + 0, het[i] + 0, hom[i] + 0 }
"""

# First file: the PLINK .fam (FID IID PAT MAT SEX PHENO); then the per-chromosome counts.
MERGE_AWK = r"""
BEGIN { OFS = "\t" }
FNR == NR {
    sex[$2] = $5 == 1 ? "male" : $5 == 2 ? "female" : "unknown"
    pheno[$2] = $6 == 2 ? "case" : $6 == 1 ? "control" : "missing"
    next
}
{ seen[$2] = 1; called[$2] += $3; het[$2] += $4; hom[$2] += $5 }
END {
    for (s in seen)
        printf("%s\t%s\t%s\t%d\t%d\t%d\t%.3f\n", s, sex[s], pheno[s], called[s], het[s], hom[s],
               called[s] ? het[s] / called[s] : 0)
}
"""

p = Pipeline(name="genomics")

# A resource group: {cohort} is the common root, {cohort.vcf} and {cohort.fam} its members.
cohort = p.read_input_group(vcf="data/cohort.vcf", fam="data/cohort.fam")

counts = []
stats = []
filtered_vcfs = []
for chrom in CHROMS:
    filt = p.new_task(name=f"filter_{chrom}")
    filt.declare_resource_group(filtered={"vcf": "{root}.vcf", "stats": "{root}.stats.tsv"})
    filt.command(
        f"awk -v chrom={chrom} -v minq={MIN_QUAL} -v stats={filt.filtered.stats} '{FILTER_AWK}' "
        f"{cohort.vcf} > {filt.filtered.vcf}"
    )

    count = p.new_task(name=f"count_{chrom}")
    count.command(f"awk -v chrom={chrom} '{COUNT_AWK}' {filt.filtered.vcf} > {count.counts}")

    counts.append(count.counts)
    stats.append(filt.filtered.stats)
    filtered_vcfs.append(filt.filtered.vcf)

merge = p.new_task(name="merge")
merge.command(
    "{ printf 'sample\\tsex\\tphenotype\\tn_called\\tn_het\\tn_hom_alt\\thet_ratio\\n'; "
    f"awk '{MERGE_AWK}' {cohort.fam} {' '.join(counts)} | LC_ALL=C sort; }} > {merge.summary}"
)

qc = p.new_task(name="qc")
qc.command(f"{{ printf 'chrom\\tn_records\\tn_pass\\tn_fail\\n'; cat {' '.join(stats)}; }} > {qc.stats}")

bundle = p.new_task(name="bundle")
bundle.command(
    f"{{ awk '/^#/' {filtered_vcfs[0]}; "
    f"awk '!/^#/' {' '.join(filtered_vcfs)} | LC_ALL=C sort -k1,1 -k2,2n; }} "
    f"| gzip -n > {bundle.vcf_gz}"
)

p.write_output(merge.summary, "results/per_sample_summary.tsv")
p.write_output(qc.stats, "results/filter_stats.tsv")
p.write_output(bundle.vcf_gz, "results/cohort.filtered.vcf.gz")

p.run()
